"""What every benchmark shares: the machine and versions it ran on, a measured subprocess, BENCHMARKS.md.

Each measured step runs in its own process and is reaped with os.wait4, whose rusage holds that process's
peak RSS and that of every child it waited for (the llama.cpp converter is a grandchild of its step): a
per-step figure, which RUSAGE_CHILDREN in the parent is not (it only ever grows across steps).
"""
import datetime
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
PACKAGES = ("torch", "unsloth", "unsloth_zoo", "trl", "transformers", "peft", "bitsandbytes", "llama_cpp_python")
GiB = 2**30

if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repository
    sys.path.insert(0, str(ROOT))


# --- the machine and the software --------------------------------------------------------------------------

def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / GiB
    return 0.0


def gpu_name() -> str:
    """From nvidia-smi, so the parent never imports torch (nor initialises CUDA before its children)."""
    if not shutil.which("nvidia-smi"):
        return "none"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return "; ".join(out.stdout.strip().splitlines()) or "none"


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def git_state() -> str:
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = " with uncommitted changes" if run("status", "--porcelain", "--untracked-files=no") else ""
    return f"{run('rev-parse', '--short', 'HEAD')}{dirty}"


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# --- measured steps ----------------------------------------------------------------------------------------

def run_measured(argv, log_path: Path, cwd=None, env=None, echo=False) -> dict:
    """Run argv to completion; {"wall_s", "rc", "peak_rss_gib"}. Output goes to log_path (and, with echo,
    to our stdout line by line, each line timestamped in "lines" as (seconds since start, text))."""
    t0 = time.perf_counter()
    lines = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE if echo else log,
                                stderr=subprocess.STDOUT, text=True)
        if echo:
            for line in proc.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))
                log.write(line)
                print(line, end="", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's peak RSS, and its reaped children's
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    return {"wall_s": time.perf_counter() - t0, "rc": proc.returncode,
            "peak_rss_gib": usage.ru_maxrss * 1024 / GiB, "lines": lines}


def tail(path: Path, n=15) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


# --- BENCHMARKS.md ------------------------------------------------------------------------------------------

HEADER = """# Benchmarks

Figures written by `bench/*.py` (each run appends one section; newest last). Every section says the machine,
the versions, the exact command, the date and the load average, because the same figures move with all of
them: on the 2-core development machine other work (tests) often runs at the same time.
"""


def context(load_at_start: str) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(sys.orig_argv),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {ram_gib():.1f} GiB RAM, GPU: {gpu_name()}",
        "versions": versions(),
        "git": git_state(),
        "load": f"{load_at_start} at start, {load_average()} at end (1 / 5 / 15 min)",
    }


def append_section(title: str, ctx: dict, table: str, notes: list[str]):
    """One section at the end of BENCHMARKS.md (created with its header the first time)."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    section = [f"\n## {title}: {ctx['date']}\n",
               f"- command: `{ctx['command']}` (repository {ctx['git']})",
               f"- machine: {ctx['machine']}",
               f"- versions: {ctx['versions']}",
               f"- load average: {ctx['load']}",
               "", "```", table.rstrip("\n"), "```", ""]
    section += [f"- {n}" for n in notes]
    BENCHMARKS.write_text(text.rstrip("\n") + "\n" + "\n".join(section).rstrip("\n") + "\n")
    print(f"\nappended to {BENCHMARKS.relative_to(ROOT)}")


def format_table(header, rows) -> str:
    """Left-aligned first column, right-aligned others, widths from the content."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join(fmt(r) for r in cells)
