"""A preference-alignment app: recipe -> data -> model -> train -> export -> smoke -> chat."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: recipes/, exports/, .llamacpp/ live here


def repo_path(name) -> Path:
    """A path a recipe or flag names: as given when absolute, else relative to the repository."""
    return Path(name) if Path(name).is_absolute() else ROOT / name


class AppError(Exception):
    """A problem the user can fix (bad recipe, bad data, missing model...). The CLI prints it as one line."""
