"""Append the GPU section to BENCHMARKS.md from the files bench/gpu/run.sh wrote into OUT_DIR.

    .venv/bin/python bench/gpu/record.py OUT_DIR                 # after a GPU run (files copied back here)
    .venv/bin/python bench/gpu/record.py OUT_DIR --print         # the section on stdout only
    .venv/bin/python bench/gpu/record.py OUT_DIR --allow-dry-run # record a CPU dry run (titled as one)

Reads OUT_DIR/gpu-check.json (app/gpucheck.py's report) and, when the speed benchmark ran, dpo_speed.log. The
section's machine, versions, date and load are the GPU machine's, from the report, not this machine's.
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from common import format_table  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--file", type=Path, help="append to this file instead of BENCHMARKS.md (inside the repository)")
    p.add_argument("--print", action="store_true", help="print the section; write nothing")
    p.add_argument("--allow-dry-run", action="store_true", help="record a dry run's report (CPU) too")
    return p.parse_args()


def rows(r: dict) -> list[list]:
    """The figures, one a row (numbers: format_table right-aligns them)."""
    out = []
    if r.get("tokens_per_second") is not None:
        s = r["tokens_per_second_steps"]
        out += [["DPO tokens/s, median of the logged steps", f"{r['tokens_per_second']:,.0f}"],
                ["DPO tokens/s, slowest / fastest step", f"{min(s):,.0f} / {max(s):,.0f}"],
                ["training steps / seconds", f"{r.get('steps_done')} / {r.get('train_seconds')}"]]
    if r.get("peak_memory_gib") is not None:
        kind = "peak RSS GiB (CPU)" if r["dry_run"] else "peak GPU memory GiB (max_memory_allocated)"
        out += [[kind, f"{r['peak_memory_gib']:.2f}"], ["app/memory.py estimate GiB", f"{r.get('estimate_gib', '?')}"]]
        if r.get("measured_over_estimate"):
            out.append(["measured / estimate", f"{r['measured_over_estimate']:.2f}"])
    for s in r.get("smoke") or []:
        top1 = f"{s['top1_agreement']:.1%}" if s.get("top1_agreement") is not None else "-"
        out.append([f"smoke {s['type']}: top-1 agreement, verdict", f"{top1} {'PASS' if s['passed'] else 'FAIL'}"])
    for stage, seconds in (r.get("pipeline") or {}).get("stages", {}).items():
        out.append([f"stage seconds: {stage}", f"{seconds:.0f}"])
    if r.get("pipeline"):
        out.append(["pipeline process seconds", f"{r['pipeline']['wall_s']:.0f}"])
    out.append(["gpu-check seconds (model build included)", f"{r['wall_s']:.0f}"])
    return out


def findings(r: dict) -> list[str]:
    """The words: result, device, model, attention, llama.cpp, failed smoke reasons."""
    notes = [f"result: **{r['result']}**" + (f": {r['reason']}" if r.get("reason") else ""), f"device: {r['device']}"]
    m = r.get("model")
    if m:
        notes.append(f"model: {r['shape']} shape, Llama-3 layout, hidden {m['hidden']}, {m['layers']} layers, vocab "
                     f"{m['vocab']:,}, {m['params'] / 1e6:.0f}M parameters ({m['linear_params'] / 1e6:.1f}M in the "
                     f"decoder's linear layers, loaded in nf4), built in {m['build_s']:.0f}s")
    for key in ("attention", "llama_cpp"):
        if r.get(key):
            notes.append(f"{key.replace('_', '.')}: {r[key]['summary']}")
    notes += [f"smoke {s['type']} failed: {s['reason']}" for s in r.get("smoke") or [] if not s["passed"]]
    return notes


def speed_text(out_dir: Path) -> str | None:
    """dpo_speed's own closing lines: its shape line and its tables."""
    log = out_dir / "dpo_speed.log"
    if not log.is_file():
        return None
    lines = log.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^\S+: Llama, hidden \d+", line)), None)
    return "\n".join(lines[start:]) if start is not None else "dpo_speed.log (no tables):\n" + "\n".join(lines[-15:])


def context(r: dict, out_dir: Path) -> dict:
    v = r.get("versions") or {}
    host = r.get("host", {})
    load = lambda xs: " / ".join(f"{x:.2f}" for x in xs) if xs else "?"
    return {
        "date": r["date"],
        "command": f"bash bench/gpu/run.sh {out_dir.name}{' --dry-run' if r['dry_run'] else ''} "
                   f"(gpu-check: python -m app.gpucheck), recorded with bench/gpu/record.py",
        "machine": f"{r['device']}; {host.get('cpus', '?')} CPUs",
        "versions": ", ".join(f"{k} {val}" for k, val in v.items() if val) or "unknown",
        "git": r.get("git") or f"{common.git_state()} (here, at recording: the run's copy had no git)",
        "load": f"{load(host.get('load_at_start'))} at start, {load(host.get('load_at_end'))} at end (1 / 5 / 15 min)",
    }


def main():
    args = parse_args()
    path = args.out_dir / "gpu-check.json"
    if not path.is_file():
        sys.exit(f"{path} does not exist: run bench/gpu/run.sh {args.out_dir} first")
    r = json.loads(path.read_text())
    if r["dry_run"] and not (args.allow_dry_run or args.print):
        sys.exit(f"{path} is a dry run's (CPU) report: it is not a GPU measurement; --allow-dry-run records it anyway")
    table = format_table(["figure", "value"], rows(r))
    speed = speed_text(args.out_dir)
    if speed:
        table += "\n\n" + speed
    notes = findings(r)
    if r.get("estimate"):
        notes.append(f"memory planner (app/memory.py) for the check's recipe: {r['estimate']}.")
    notes.append("gpu-check: `python -m app dpo` on a random Llama-3-shaped model (app/shapes.py's gpu-check shape, "
                 "sharpened so its predictions are decisive), 4-bit + LoRA, 10 DPO steps of batch 2 at max_length "
                 "512, merge, GGUF f16 + q4_k_m, smoke; tokens/s is the median of the logged steps "
                 "(metrics.jsonl), peak memory train.json's.")
    if not speed:
        notes.append("dpo_speed did not run: bench/dpo_speed.py cannot cut Llama-3-8B's layers (no --layers) and the "
                     "full 32 layers do not fit the 8-minute run (TODO, bench/gpu/README.md).")
    title = ("GPU bundle dry run (CPU, no GPU): bench/gpu/run.sh --dry-run" if r["dry_run"]
             else f"GPU: gpu-check and bench/gpu/run.sh ({r.get('cuda', {}).get('name', 'GPU')})")
    ctx = context(r, args.out_dir)
    if args.print:
        print(f"## {title}: {ctx['date']}\n")
        for key in ("command", "machine", "versions", "load"):
            print(f"- {key}: {ctx[key]}")
        print("\n```\n" + table + "\n```\n")
        for n in notes:
            print(f"- {n}")
        return
    if args.file:
        common.BENCHMARKS = args.file.resolve()
    common.append_section(title, ctx, table, notes)


if __name__ == "__main__":
    main()
