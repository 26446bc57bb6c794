"""A model built once on this machine (app/tiny.py, app/smollm2.py) into its folder under .cache/: by a child
process (`python -m MODULE TMP`), one builder at a time, and stamped with the fingerprint of what it was
built from, so the folder is either complete and current or rebuilt.
"""
import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

from app import ROOT


def build_once(cache: Path, module: str, fingerprint, is_built, what: str, log=print, env=None,
               shown=lambda line: False) -> Path:
    """`cache`, building it first when `is_built()` says no. `fingerprint()` is written into it last;
    `shown(line)` picks the child's output lines that are said through `log` (progress) as they come."""
    if is_built():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time (two `make` targets, or a test session and a command, may start together): the
    # others wait here and then take its build; without the lock they shared one .tmp folder and one
    # removed what another was writing (a model without its tokenizer)
    with open(cache.with_name(cache.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built():
            return cache
        log(f"building {what}")
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        output = []
        with subprocess.Popen([sys.executable, "-m", module, str(tmp)], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            for line in proc.stdout:
                output.append(line)
                if shown(line):
                    log(line.rstrip())
        if proc.returncode != 0:
            raise RuntimeError(f"building {cache.name} failed:\n" + "".join(output[-40:]))
        (tmp / "fingerprint.txt").write_text(fingerprint())
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    return cache
