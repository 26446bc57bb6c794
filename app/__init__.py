"""A preference-alignment app: recipe -> data -> model -> train -> export -> smoke -> chat."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: recipes/, exports/, .llamacpp/ live here


class AppError(Exception):
    """A problem the user can fix (bad recipe, bad data, missing model...). The CLI prints it as one line."""
