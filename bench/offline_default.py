"""The offline recipes, timed: `make dpo [MODEL=...]` (environment already set up), stage by stage.

    .venv/bin/python bench/offline_default.py                      # make dpo (tiny), warm setup
    .venv/bin/python bench/offline_default.py --model smollm2-135m # the real model (its build counted once)
    .venv/bin/python bench/offline_default.py --setup              # also: make setup into a fresh venv in /tmp

Stage times are the run's own timings.json (app/progress.py: preflight, load, reference, evaluation,
training, export, smoke, report); what is left of the wall time is the interpreter's start and exit and
make's. Training's own figures come from metrics.jsonl and train.json. The run folder is kept: it is an
ordinary run (exports/latest moves to it when its smoke test passes, as after any `make dpo`).

--setup times `make VENV=<tmp>/venv setup`: a new virtualenv with the pinned stack, from the pip cache and
the llama-cpp-python wheel already built on this machine; each command make runs is timed from its echo.
The cold variant (empty caches) is not offered: it needs the package registry over the network and
recompiles llama.cpp (~12 minutes on 2 cores), which is not a figure this machine can take offline.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_section, context, format_table, load_average, run_measured, tail  # noqa: E402

EXPORTS = ROOT / "exports"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", action="store_true", help="also time `make setup` into a fresh venv in /tmp")
    p.add_argument("--model", default="tiny", help="the recipe, as make dpo MODEL=... takes it (default: tiny)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    return p.parse_args()


# --- make dpo ------------------------------------------------------------------------------------------------

def make_dpo_command(model: str) -> list[str]:
    """`make dpo MODEL=...`; when the venv works but make would set it up again (no stamp for this build),
    `-o` tells make to take it as done, which is the warm path this measures."""
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import app"], cwd=ROOT).returncode:
        sys.exit("no working .venv: run `make setup` first (or time the setup with --setup)")
    stamp = subprocess.run(["make", "-s", "--eval=print-ready: ; @echo $(READY)", "print-ready"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    up_to_date = subprocess.run(["make", "-q", stamp], cwd=ROOT, capture_output=True).returncode == 0
    return ["make", "dpo", f"MODEL={model}"] if up_to_date else ["make", "-o", stamp, "dpo", f"MODEL={model}"]


def time_make_dpo(work: Path, model: str) -> dict:
    command = make_dpo_command(model)
    before = {p.name for p in EXPORTS.iterdir()}
    print(f"$ {' '.join(command)}", flush=True)
    start = time.time()
    r = run_measured(command, work / "make-dpo.log", cwd=ROOT, echo=True)
    if r["rc"]:
        sys.exit(f"`{' '.join(command)}` failed (exit {r['rc']})")
    # the folder this run names ("run folder: ..."); other processes (tests) may add runs to exports/ meanwhile
    named = [Path(text.split(":", 1)[1].strip()) for _, text in r["lines"] if text.startswith("run folder:")]
    new = [EXPORTS / n for n in {p.name for p in EXPORTS.iterdir()} - before if (EXPORTS / n).is_dir()]
    runs = named or new
    if len(runs) != 1 or not runs[0].is_dir():
        sys.exit(f"cannot tell which run folder `make dpo` wrote: {[str(r) for r in runs]}")
    return {"command": " ".join(command), "start": start, "end": start + r["wall_s"], "run": runs[0], **r}


def stage_times(run: Path, total: float) -> list[tuple[str, float]]:
    """[(stage, seconds)] from the run's timings.json, in the order the stages ran, and the rest of the wall
    time (interpreter start and exit, make)."""
    timings = json.loads((run / "timings.json").read_text())
    return [*timings.items(), ("the rest: interpreter, imports before preflight, make", total - sum(timings.values()))]


def training_figures(run: Path) -> dict:
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in logs if "loss" in r]
    final = next((r for r in reversed(logs) if "train_runtime" in r), {})
    train = json.loads((run / "train.json").read_text()) if (run / "train.json").exists() else {}
    return {"steps": final.get("step", steps[-1]["step"] if steps else 0), "train_runtime": final.get("train_runtime"),
            "tokens": final.get("num_input_tokens_seen"), "peak_memory_gb": train.get("peak_memory_gb"),
            "last_loss": steps[-1]["loss"] if steps else None}


# --- make setup into a fresh venv ------------------------------------------------------------------------------

def time_setup(work: Path) -> dict:
    """`make VENV=<tmp>/venv setup`, each echoed command timed until the next one (or the end)."""
    venv = work / "venv"
    command = ["make", f"VENV={venv}", "setup"]
    print(f"$ {' '.join(command)}", flush=True)
    r = run_measured(command, work / "make-setup.log", cwd=ROOT, echo=True)
    if r["rc"]:
        sys.exit(f"`{' '.join(command)}` failed (exit {r['rc']}); its log ends:\n{tail(work / 'make-setup.log')}")
    # make echoes each command before running it (not the @-silenced wheel check, which counts with the one before)
    commands = [(t, text) for t, text in r["lines"] if text.startswith(("python3 ", str(venv), "touch "))]
    steps = []
    for (t, text), nxt in zip(commands, [c[0] for c in commands[1:]] + [r["wall_s"]]):
        steps.append((text.replace(str(venv), "$VENV")[:90], nxt - t))
    return {"command": " ".join(command).replace(str(venv), "/tmp/.../venv"), "steps": steps, **r}


# --- report ----------------------------------------------------------------------------------------------------

def main():
    args = parse_args()
    load_at_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench-offline-", dir="/tmp"))
    try:
        setup = time_setup(work) if args.setup else None
        dpo = time_make_dpo(work, args.model)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    total = dpo["wall_s"]
    rows = [[stage, f"{s:.1f}", f"{s / total:.0%}"] for stage, s in stage_times(dpo["run"], total)]
    rows.append([f"total: {dpo['command']}", f"{total:.1f}", "100%"])
    text = format_table(["stage (the run's timings.json)", "s", "share"], rows)
    if setup:
        rows = [[cmd, f"{s:.1f}"] for cmd, s in setup["steps"]] + [[f"total: {setup['command']}", f"{setup['wall_s']:.1f}"]]
        text = format_table(["make setup, fresh venv, warm caches: command", "s"], rows) + "\n\n" + text
    train = training_figures(dpo["run"])
    print(f"\n{text}")
    if args.no_record:
        return
    tok_s = f", {train['tokens'] / train['train_runtime']:,.0f} tok/s" if train["tokens"] and train["train_runtime"] else ""
    notes = [
        f"run folder: exports/{dpo['run'].name} (kept; an ordinary run). Training: {train['steps']} steps, TRL's "
        f"train_runtime {train['train_runtime']:.1f}s{tok_s}, last logged loss {train['last_loss']:.4f}; train.json "
        f"peak memory {train['peak_memory_gb']} GB (the training process's peak RSS).",
        f"peak RSS of the whole `{dpo['command']}` (its largest process, os.wait4): {dpo['peak_rss_gib']:.2f} GiB.",
        "stages (app/progress.py): load = importing Unsloth, the data and the model (a built model's first "
        "build too); reference = DPO's reference log-probs up front (0 when they are scored in every step); "
        "evaluation = the probe replies and the held-out pairs, before and after; export = merge, its check, "
        "GGUF conversion and quantization; smoke = the float32 reference's child process and every GGUF.",
    ]
    if "-o" in dpo["command"].split():
        notes.append("`-o <stamp>`: the venv works but has no stamp for this llama.cpp build; -o keeps make from "
                     "reinstalling into it, so this is the warm path that `make dpo` takes once set up.")
    if setup:
        notes.append("setup: a fresh virtualenv in /tmp via the Makefile's own recipe (VENV overridden), packages "
                     "from the local pip cache / index and the llama-cpp-python wheel built earlier on this machine.")
    notes.append("Not measured: setup with cold caches. It needs the package registry over the network and "
                 "compiles llama.cpp (~12 minutes on 2 cores, README); neither is available offline here.")
    append_section(f"offline_default (make dpo, {args.model})", context(load_at_start), text, notes)


if __name__ == "__main__":
    main()
