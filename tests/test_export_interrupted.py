"""`python -m app export RUN` killed part-way (SIGKILL: no handler runs) leaves no manifest that names a
missing or changed file and no half-written file under a final name; the next export completes and
`verify` passes.

The run is a copy of the tiny_run fixture's (the shared fixture stays whole), so each export rewrites
files that a complete run already has: a stale manifest would show here.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import ROOT
from app.cli import main
from app.runs import EXPORTS, verify_run

# where to kill, as a condition on the run folder, in the order an export reaches them
POINTS = {
    "merging": lambda run, t0: (run / ".merged.tmp").exists(),  # Unsloth is writing the merged weights
    "converting": lambda run, t0: any(p.stat().st_size > 0 for p in (run / "gguf").glob(".*-f16.gguf.tmp")),
    "quantizing": lambda run, t0: any((run / "gguf").glob(".*-q*.gguf.tmp"))
    or (run / "gguf" / "tiny-q8_0.gguf").stat().st_mtime > t0,
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def reached(point: str, run: Path, t0: float) -> bool:
    try:
        return POINTS[point](run, t0)
    except FileNotFoundError:  # a temporary file renamed while we looked
        return False


def kill_when(run: Path, point: str, log: Path):
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "export", str(run)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV)
    try:
        deadline = t0 + 300
        while not reached(point, run, t0):
            assert proc.poll() is None, f"export ended before '{point}': {log.read_text()[-2000:]}"
            assert time.time() < deadline, f"'{point}' never came"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL


def assert_nothing_half_written(run: Path):
    """Every file under a final name is whole: GGUFs parse to their last tensor, safetensors load, JSON
    parses, PNGs end. Temporary names (a leading dot) may hold anything."""
    from gguf import GGUFReader
    from safetensors import safe_open

    for path in run.rglob("*"):
        rel = path.relative_to(run)
        if not path.is_file() or rel.parts[0] == "checkpoints" or any(p.startswith(".") for p in rel.parts):
            continue
        if path.suffix == ".gguf":
            GGUFReader(path)  # raises on a file cut short (its tensors would lie past the end)
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), rel


@pytest.mark.slow
def test_an_export_killed_anywhere_never_leaves_a_lying_manifest_and_reruns(tiny_run, tmp_path):
    latest = os.readlink(EXPORTS / "latest") if (EXPORTS / "latest").is_symlink() else None
    run = EXPORTS / f"interrupted-export-{os.getpid()}"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    try:
        assert verify_run(run) == []
        for point in POINTS:
            kill_when(run, point, tmp_path / f"{point}.log")
            manifest = run / "manifest.json"
            assert not manifest.exists() or verify_run(run) == [], f"killed while {point}: the manifest lies"
            assert not manifest.exists(), f"killed while {point}: the old manifest outlived the export's start"
            assert_nothing_half_written(run)

        proc = subprocess.run([sys.executable, "-m", "app", "export", str(run)], cwd=ROOT, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, env=ENV, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert main(["verify", str(run)]) == 0
        leftovers = [str(p.relative_to(run)) for p in run.rglob(".*")]
        assert not leftovers, f"temporary files a completed export left behind: {leftovers}"
        assert_nothing_half_written(run)
    finally:
        shutil.rmtree(run, ignore_errors=True)
        link = EXPORTS / "latest"  # the rerun's smoke test moved it to this run
        if link.is_symlink() and os.readlink(link) == run.name:
            link.unlink()
            if latest:
                link.symlink_to(latest)
