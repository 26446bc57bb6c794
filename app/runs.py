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


def verify_run(run: Path) -> list[str]:
    """Problems found by re-hashing every file the manifest names ([] when the run is intact)."""
    path = run / "manifest.json"
    if not path.is_file():
        raise AppError(f"{run.name} has no manifest.json: it never finished (or is being written)")
    problems = []
    for rel, entry in json.loads(path.read_text())["files"].items():
        file = run / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif file.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {file.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif sha256(file) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    return problems


def check_gguf_file(path: Path):
    """AppError unless the file starts like a GGUF (magic, version 2 or 3) and, when its run has a manifest
    naming it, has the size recorded there: llama.cpp would crash or read garbage otherwise."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF" or int.from_bytes(head[4:8], "little") not in (2, 3):
        raise AppError(f"{path.name} is not a GGUF file (bad magic or version)")
    manifest = path.parent.parent / "manifest.json"
    if manifest.is_file():
        entry = json.loads(manifest.read_text())["files"].get(f"{path.parent.name}/{path.name}")
        if entry and entry["bytes"] != path.stat().st_size:
            raise AppError(f"{path.name} is {path.stat().st_size} bytes but its run's manifest says "
                           f"{entry['bytes']}: the file is damaged or incomplete")


def mark_latest(run: Path):
    link, tmp = EXPORTS / "latest", EXPORTS / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run.name)
    os.replace(tmp, link)
