"""The run folder exports/<recipe>-<UTC time>/: creation, atomic writes, manifest, `latest`.

A run is complete when its manifest.json exists (written last, naming every file with size and sha256);
exports/latest moves to a run only after its smoke test passes.
"""
import contextlib
import datetime
import errno
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
    if run.resolve().parent != EXPORTS.resolve():  # recipe names are checked; this is the last guard
        raise AppError(f"run name '{recipe_name}' would put the run folder outside exports/")
    run.mkdir(parents=True)
    return run


def resolve_run(arg: str | None, write: bool = False) -> Path:
    """A run folder from a path, a run name in exports/, or `latest` (the default). `write`: the command
    writes into the run (export, smoke, report, resume), which must then lie inside exports/."""
    arg = arg or "latest"
    for candidate in (Path(arg), EXPORTS / arg):
        if candidate.is_dir():
            run = candidate.resolve()
            if write and EXPORTS.resolve() not in run.parents:
                raise AppError(f"{arg} is outside exports/ ({run}); commands that write into a run only work on "
                               f"run folders in {EXPORTS}")
            return run
    if arg == "latest":
        raise AppError("no finished run in exports/ yet; run `make dpo` first")
    raise AppError(f"run '{arg}' not found (give a folder or a name in exports/)")


def disk_full(error: BaseException) -> str | None:
    """The reason when `error` says the disk (or the file size limit) is full, else None. Libraries word it
    differently: OSError carries errno, safetensors and subprocesses only the text."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return os.strerror(error.errno)
    text = str(error)
    return next((os.strerror(n) for n in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
                 if os.strerror(n) in text or f"os error {n})" in text), None)


def write_json(path: Path, value):
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: Path):
    """The JSON in `path`, or None where there is no such file (a run that has not reached that stage)."""
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl, one dict per logging step (train.py's MetricsLog); [] before the first step."""
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# what each method logs in metrics.jsonl as its accuracy and margin (train keys; eval keys have an "eval_" prefix)
ACCURACY_KEYS = ("rewards/accuracies", "mean_token_accuracy", "accuracy")
MARGIN_KEYS = ("rewards/margins", "margin")


def write_text(path: Path, text: str):
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes):
    """Write to a temporary name and rename: a reader never sees half a file (the name holds the process id,
    so two processes writing one file never write into each other's temporary)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise AppError(f"could not write {path}: {disk_full(e)}; free some disk space and run the command "
                           f"again") from None
        raise
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
        temporary = any(part.startswith(".") for part in rel.parts)  # .merged.tmp/..., .smoke.json.tmp
        if path.is_file() and rel.parts[0] not in SKIP_DIRS and path.name not in SKIP and not temporary:
            files[str(rel)] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest = {"run": run.name, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "files": files}
    write_json(run / "manifest.json", manifest)
    return manifest


def discard_manifest(run: Path) -> bool:
    """Remove manifest.json before a run's files are rewritten (export, smoke, report): until it is written
    again, last, the run reads as incomplete, so an interrupted rewrite never leaves a manifest naming files
    that changed. True when there was one."""
    path = run / "manifest.json"
    had = path.is_file()
    path.unlink(missing_ok=True)
    return had


@contextlib.contextmanager
def rewriting_finished_run(run: Path):
    """For commands that add or rewrite files of a run after its export (report, compare): the manifest
    goes first, so a rewrite cut short never leaves one naming files that changed, and is written again
    at the end, naming the new files too. A run without a manifest (not finished) stays without one."""
    had_manifest = discard_manifest(run)
    try:
        yield
    finally:
        if had_manifest:
            write_manifest(run)


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


def mark_latest(run: Path):
    link, tmp = EXPORTS / "latest", EXPORTS / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run.name)
    os.replace(tmp, link)


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def last_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint: Trainer writes trainer_state.json last, so a checkpoint cut short
    by a crash has none and is passed over."""
    done = [c for c in (run / "checkpoints").glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    return max(done, key=checkpoint_step, default=None)
