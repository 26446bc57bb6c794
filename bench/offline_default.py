"""The offline default, timed: `make dpo` (the tiny recipe, environment already set up), stage by stage.

    .venv/bin/python bench/offline_default.py           # make dpo, warm setup
    .venv/bin/python bench/offline_default.py --setup   # also: make setup into a fresh venv in /tmp, warm caches

Stage times come from the run folder `make dpo` leaves in exports/: each file's modification time marks
when its stage finished (recipe.yaml when the run folder was made, adapter/ after training, merged/, each
gguf/*.gguf, smoke.json, manifest.json ...), so a stage runs from the end of the one before to its last
file. Training's own figures come from metrics.jsonl and train.json. The run folder is kept: it is an
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
# a run folder's top-level names -> the stage that writes them (anything else is shown under its own name)
STAGES = {"recipe.yaml": "start-up: make, imports, data, model load", "metrics.jsonl": "train",
          "train.json": "train", "adapter": "train", "checkpoints": "train", "preference_eval.json": "train",
          "merged": "merge", "smoke.json": "smoke test", "report.md": "report", "plots": "report",
          "manifest.json": "manifest"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", action="store_true", help="also time `make setup` into a fresh venv in /tmp")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    return p.parse_args()


# --- make dpo ------------------------------------------------------------------------------------------------

def make_dpo_command() -> list[str]:
    """`make dpo`; when the venv works but carries no .ready stamp (set up by hand), `-o` tells make to take
    it as done instead of reinstalling into it, which would not be the warm path this measures."""
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import app"], cwd=ROOT).returncode:
        sys.exit("no working .venv: run `make setup` first (or time the setup with --setup)")
    up_to_date = subprocess.run(["make", "-q", ".venv/.ready"], cwd=ROOT, capture_output=True).returncode == 0
    return ["make", "dpo"] if up_to_date else ["make", "-o", ".venv/.ready", "dpo"]


def time_make_dpo(work: Path) -> dict:
    command = make_dpo_command()
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


def stage_times(run: Path, start: float, end: float) -> list[tuple[str, float]]:
    """[(stage, seconds)] in order: each stage ends at the newest file it wrote (checkpoints/ left out:
    Trainer writes it before the adapter, inside the training stage)."""
    ends = {}
    for path in run.rglob("*"):
        rel = path.relative_to(run)
        if not path.is_file() or rel.parts[0] == "checkpoints" or path.name.startswith("."):
            continue
        if rel.parts[0] == "gguf":  # one stage per GGUF type; other files there (a Modelfile) by name
            stage = f"gguf {path.stem.rsplit('-', 1)[-1]}" if path.suffix == ".gguf" else f"gguf/{path.name}"
        else:
            stage = STAGES.get(rel.parts[0], rel.parts[0])
        ends[stage] = max(ends.get(stage, 0.0), path.stat().st_mtime)
    stages, previous = [], start
    for stage, t in sorted(ends.items(), key=lambda kv: kv[1]):
        stages.append((stage, t - previous))
        previous = t
    stages.append(("exit: after the last file", end - previous))
    return stages


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
        dpo = time_make_dpo(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    total = dpo["wall_s"]
    rows = [[stage, f"{s:.1f}", f"{s / total:.0%}"] for stage, s in stage_times(dpo["run"], dpo["start"], dpo["end"])]
    rows.append([f"total: {dpo['command']}", f"{total:.1f}", "100%"])
    text = format_table(["stage (ends at its last file in the run folder)", "s", "share"], rows)
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
        "stages: from the end of the previous stage to the newest file of this one, by modification time; "
        "`train` includes the before/after sample replies and the held-out evaluation; the merge check "
        "(merged vs trained logits) falls into the first gguf stage, which it precedes.",
    ]
    if dpo["command"] != "make dpo":
        notes.append("`-o .venv/.ready`: the venv was set up without make's .ready stamp; -o keeps make from "
                     "reinstalling into it, so this is the warm path that `make dpo` takes once set up.")
    if setup:
        notes.append("setup: a fresh virtualenv in /tmp via the Makefile's own recipe (VENV overridden), packages "
                     "from the local pip cache / index and the llama-cpp-python wheel built earlier on this machine.")
    notes.append("Not measured: setup with cold caches. It needs the package registry over the network and "
                 "compiles llama.cpp (~12 minutes on 2 cores, README); neither is available offline here.")
    append_section("offline_default (make dpo, tiny)", context(load_at_start), text, notes)


if __name__ == "__main__":
    main()
