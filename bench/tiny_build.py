"""What building the tiny model reproducibly costs: the pinned build against the machine's own kernels.

    .venv/bin/python bench/tiny_build.py              # both builds, then a section in BENCHMARKS.md

Each build is `python -m app.tiny OUT` in its own process: once with app/tiny.py's PINNED_ENV (MKL's
reproducible mode, ATen's generic kernels, one thread), as `ensure_model` runs it, and once with the
machine's own kernels and both cores (ATEN_CPU_CAPABILITY and MKL_CBWR unset). Each prints the weights'
digest: the pinned one is the same on every build on one machine (and measured different across CPU makers:
AMD EPYC f792af0e5d522cf1, Intel Xeon e3e2eaaa9ad482a4); the other shows what a build on this machine's
kernels would be.
"""
import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_section, context, format_table, load_average, run_measured  # noqa: E402


def build(out: Path, pinned: bool) -> dict:
    from app.tiny import PINNED_ENV
    env = {k: v for k, v in os.environ.items() if k not in PINNED_ENV}
    env.update(PINNED_ENV if pinned else {"OMP_NUM_THREADS": str(os.cpu_count())})
    result = run_measured([sys.executable, "-m", "app.tiny", str(out)], out.with_suffix(".log"), cwd=ROOT, env=env)
    text = out.with_suffix(".log").read_text()
    digest = re.search(r"weights digest (\w+)", text)
    capability = re.search(r"torch capability (\w+)", text)
    return {"build": "pinned (as make dpo builds it)" if pinned else "this machine's kernels",
            "seconds": round(result["wall_s"], 1), "peak_rss_gib": round(result["peak_rss_gib"], 2),
            "digest": digest[1] if digest else "failed", "capability": capability[1] if capability else "?"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()
    load_at_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    rows = [build(work / "pinned", True), build(work / "native", False)]
    table = format_table(["build", "seconds", "peak RSS GiB", "ATen kernels", "weights digest"],
                         [[r["build"], r["seconds"], r["peak_rss_gib"], r["capability"], r["digest"]] for r in rows])
    print(table)
    if not args.no_record:
        append_section("Tiny model build: pinned for the same weights everywhere, against native kernels",
                       context(load_at_start), table,
                       ["The pinned build is what `make dpo` and the tests use (app/tiny.py PINNED_ENV); its digest is "
                        "the one to compare across machines. The native build differs from it on this machine already: "
                        "the warm-up is chaotic, so a rounding difference in step 1 becomes another model."])


if __name__ == "__main__":
    main()
