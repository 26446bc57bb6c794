"""The run folder exports/<recipe>-<UTC time>/: creation, atomic writes, manifest, `latest`.

A run is complete when its manifest.json exists (written last, naming every file with size and sha256);
exports/latest moves to a run only after its smoke test passes.
"""
import datetime
import hashlib
import json
import os
from pathlib import Path

from app import ROOT, AppError

EXPORTS = ROOT / "exports"
SKIP = {"manifest.json"}
SKIP_DIRS = {"checkpoints"}  # Trainer's resumable state: large, transient, not a product of the run


def create_run(recipe_name: str) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run = EXPORTS / f"{recipe_name}-{stamp}"
    n = 1
    while run.exists():  # two runs in the same second
        n += 1
        run = EXPORTS / f"{recipe_name}-{stamp}-{n}"
    run.mkdir(parents=True)
    return run


def resolve_run(arg: str | None) -> Path:
    """A run folder from a path, a run name in exports/, or `latest` (the default)."""
    arg = arg or "latest"
    for candidate in (Path(arg), EXPORTS / arg):
        if candidate.is_dir():
            return candidate.resolve()
    if arg == "latest":
        raise AppError("no finished run in exports/ yet; run `make dpo` first")
    raise AppError(f"run '{arg}' not found (give a folder or a name in exports/)")


def write_json(path: Path, value):
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_text(path: Path, text: str):
    """Write to a temporary name and rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(run: Path) -> dict:
    files = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run)
        if path.is_file() and rel.parts[0] not in SKIP_DIRS and path.name not in SKIP and not path.name.startswith("."):
            files[str(rel)] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest = {"run": run.name, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "files": files}
    write_json(run / "manifest.json", manifest)
    return manifest


def mark_latest(run: Path):
    link, tmp = EXPORTS / "latest", EXPORTS / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run.name)
    os.replace(tmp, link)
