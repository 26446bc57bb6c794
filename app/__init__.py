"""A preference-alignment app: recipe -> data -> model -> train -> export -> smoke -> chat."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: recipes/, exports/, .llamacpp/ live here


def repo_path(name) -> Path:
    """A path a recipe or flag names: as given when absolute, else relative to the repository."""
    return Path(name) if Path(name).is_absolute() else ROOT / name


def child_env(**extra: str) -> dict:
    """The environment of this app's child processes (`python -m app.X`): offline, the repository importable
    from any working directory, tokenizers single-threaded; `extra` adds or overrides variables."""
    import os
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), **extra}


class AppError(Exception):
    """A problem the user can fix (bad recipe, bad data, missing model...). The CLI prints it as one line."""
