"""gpu-check: the app's whole GPU path on a tiny model of a real architecture, in about two minutes, before a
long run (`python -m app.gpucheck [--dry-run] [--out FILE]`; `make gpu-check`).

What a PASS proves, on this machine's GPU and with the versions installed here: Unsloth loads a Llama-3-shaped
model in 4-bit (bitsandbytes nf4) on CUDA, attaches LoRA with Unsloth's gradient checkpointing, and TRL's
DPOTrainer runs 10 steps of it; the app then merges the adapter into 16-bit weights, llama.cpp's converter
writes GGUF f16 and llama.cpp quantizes q4_k_m, and the smoke test finds both GGUFs agree with the merged model.
It is the real pipeline, `python -m app dpo RECIPE` in a child process (preflight included), on a random model
built offline (app/shapes.py's "gpu-check" shape: hidden 512, 2 layers, Meta's 128,256-token Llama-3
tokenizer; nothing is downloaded). What it does not prove: speed or memory at a real model's size (see
bench/dpo_speed.py), nor anything about the quality of training (the weights are random).

The report: tokens/s (median of the logged steps), peak GPU memory against app/memory.py's estimate for the
same recipe, the attention backend Unsloth chose (flash-attn, xformers or SDPA, and why: Unsloth falls back to
SDPA when xformers is missing or does not load), whether llama.cpp can offload to the GPU, the versions, and
PASS or one sentence naming what broke (the failing stage and its last error line).

Without a CUDA GPU it says so in one line (AppError; exit 2). `--dry-run` runs the same path on the CPU
(Unsloth's CPU backend, bfloat16) so that the check and bench/gpu/ can be tested on a machine without a GPU;
its memory figure is then the process's peak RSS, not GPU memory.

When llama-cpp-python is not installed (an offline GPU machine without a wheel for its Python), the check
stops at once and the report says llama.cpp is missing.
"""
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from app import ROOT, AppError, child_env
from app.progress import last_stage, read_events, stage_seconds
from app.runs import EXPORTS, read_json, read_metrics

SHAPE = "gpu-check"  # the dry run too: 1.5 minutes on two idle CPU cores, 4 when they are shared
WORK = ROOT / ".cache" / "gpu-check"  # recipe, probe and logs of the last check
STEPS = 10
GGUF = ["f16", "q4_k_m"]
TIMEOUT_S = 1800  # the whole pipeline child; a consumer GPU takes about two minutes
PROGRESS = WORK / "progress.jsonl"  # the pipeline's stage events (app/progress.py): which stage ran, and how long


def run_gpu_check(dry_run: bool = False, log=print, out: Path | None = None, timeout: float = TIMEOUT_S,
                  keep: bool = False) -> dict:
    """The check; returns the report (also written to `out` as JSON when given). AppError when no CUDA GPU is
    visible and not dry_run. The report's "result" is "PASS" or "FAIL" (then "reason" is one sentence).

    The run folder it trains into (exports/gpu-check-dpo-<time>, ~0.7 GB) is removed afterwards unless `keep`;
    its train.json, metrics.jsonl, smoke.json, recipe.yaml and report.md stay in .cache/gpu-check/last-run/.
    exports/latest is put back as it was: `make chat` never lands on the check's random model."""
    t0 = time.time()
    cuda = cuda_state()
    if not cuda["available"] and not dry_run:
        raise AppError(f"no CUDA GPU is visible to torch ({cuda['why']}); gpu-check needs one; on a CPU run `make dpo`")
    WORK.mkdir(parents=True, exist_ok=True)
    env = gpucheck_env(dry_run)
    shape = SHAPE
    report = {"result": None, "reason": None, "dry_run": dry_run,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
              "device": "CPU (dry run: Unsloth's CPU backend)" if dry_run else f"CUDA GPU, torch {cuda['torch']}",
              "cuda": cuda if not dry_run else {**cuda, "used": False},
              "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_at_start": os.getloadavg()},
              "git": git_state(),
              "shape": shape, "steps": STEPS, "gguf": GGUF}
    log(f"gpu-check{' (dry run, on the CPU)' if dry_run else ''}: building the model, probing Unsloth and llama.cpp")

    # the probe (Unsloth's import, its attention choice, llama.cpp, versions) runs while the model is built
    probe_path = WORK / "probe.json"
    probe_path.unlink(missing_ok=True)
    probe = subprocess.Popen([sys.executable, "-m", "app.gpucheck_probe", str(probe_path)], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t = time.time()
        model = build_shape(shape, env, log)
        report["model"] = {"folder": str(model), "build_s": round(time.time() - t, 1), **shape_summary(model)}
    except AppError as e:
        probe.kill()
        return finish(report, out, log, t0, f"building the {shape} model failed: {e}")
    finally:
        _, probe_err = probe.communicate()
    if not probe_path.is_file():  # a crash in Unsloth's import (a broken kernel package) lands here
        report["unsloth_import"] = f"the probe process failed (exit {probe.returncode})"
        return finish(report, out, log, t0, f"importing Unsloth failed (exit {probe.returncode}): "
                                            f"{last_error(probe_err.splitlines())}")
    info = json.loads(probe_path.read_text())
    report.update(versions=info["versions"], attention=info["attention"], llama_cpp=info["llama_cpp"],
                  unsloth_import=info["unsloth_import"])
    if info.get("gpu") and not dry_run:
        report["cuda"].update(info["gpu"])
        report["device"] = describe_gpu(report["cuda"])
    log(f"device: {report['device']}")
    log(f"versions: {format_versions(info['versions'])}")
    log(f"attention: {info['attention']['summary']}")
    log(f"llama.cpp: {info['llama_cpp']['summary']}")
    if info["unsloth_import"] != "ok":
        return finish(report, out, log, t0, f"Unsloth does not import: {info['unsloth_import']}")

    if not info["llama_cpp"]["installed"]:
        return finish(report, out, log, t0, f"llama.cpp is missing ({info['llama_cpp']['summary']}): export and smoke "
                      f"need it; `make setup` (GPU=1 for CUDA) installs it")
    recipe_path = write_recipe(WORK / ("gpu-check-dry.yaml" if dry_run else "gpu-check.yaml"), model, dry_run)
    argv = [sys.executable, "-m", "app", "dpo", str(recipe_path)]
    log(f"$ python {' '.join(argv[1:])}   (log: {WORK / 'pipeline.log'})")
    shutil.rmtree(WORK / "last-run", ignore_errors=True)
    latest = EXPORTS / "latest"
    old_latest = os.readlink(latest) if latest.is_symlink() else None
    PROGRESS.unlink(missing_ok=True)
    child = run_logged(argv, WORK / "pipeline.log", {**env, "PREFALIGN_PROGRESS": str(PROGRESS)}, timeout,
                       lambda line: log(f"  | {line}"))
    events = read_events(PROGRESS)
    report["pipeline"] = {"argv": argv[1:], "rc": child["rc"], "wall_s": round(child["wall_s"], 1),
                          "timed_out": child["timed_out"], "stages": stage_seconds(events),
                          "log": str(WORK / "pipeline.log")}
    run = next((Path(text.split(":", 1)[1].strip().split(" (")[0]) for _, text in child["lines"]
                if text.startswith("run folder:")), None)
    report["run"] = str(run) if run else None
    if run:
        report.update(figures(run, recipe_path, dry_run))
        report["artifacts"] = str(keep_artifacts(run, WORK / "last-run"))
        report["run_kept"] = keep
        if not keep:
            shutil.rmtree(run, ignore_errors=True)
    restore_latest(latest, old_latest, run)
    if child["timed_out"]:
        return finish(report, out, log, t0, f"the pipeline did not finish within {timeout:.0f}s "
                                            f"(in its {last_stage(events) or 'startup'} stage)")
    if child["rc"] != 0:
        return finish(report, out, log, t0, failure_sentence(events, [text for _, text in child["lines"]]))
    return finish(report, out, log, t0, None)


# --- the parts ---------------------------------------------------------------------------------------------

def cuda_state() -> dict:
    """Whether torch sees a CUDA device; nothing more is asked here, so this process takes no GPU memory
    (the probe child reads the device's properties)."""
    with warnings.catch_warnings():  # a CUDA build without a driver warns on is_available(): the report says it
        warnings.simplefilter("ignore")
        import torch
        available = torch.cuda.is_available()
        state = {"available": available, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
        if available:
            state["count"] = torch.cuda.device_count()
        elif torch.version.cuda is None:
            state["why"] = f"torch {torch.__version__} is a CPU-only build"
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            state["why"] = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no device"
                            + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else
                               ": no NVIDIA driver or no GPU"))
    return state


def git_state() -> str | None:
    """The commit of the code that ran (None where the tree has no git, as a copied working tree may not)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "") if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def describe_gpu(cuda: dict) -> str:
    return (f"{cuda['name']} ({cuda['total_gib']:.0f} GiB, compute capability {cuda['capability']}, "
            f"bf16 {'yes' if cuda['bf16'] else 'no: fp16'}), torch {cuda['torch']} with CUDA {cuda['torch_cuda']}")


def gpucheck_env(dry_run: bool) -> dict:
    # dry run: the CPU path even where a GPU is present
    return child_env(PYTHONUNBUFFERED="1", **({"CUDA_VISIBLE_DEVICES": ""} if dry_run else {}))


def build_shape(shape: str, env: dict, log) -> Path:
    """WORK/model-SHAPE, built once in a child (the tokenizer import alone holds ~1.1 GB): app/shapes.py's
    random model, then made decisive (`sharpen`)."""
    folder = WORK / f"model-{shape}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    log(f"building the {shape} model in {folder} (random weights, Llama-3 tokenizer; once, ~30 s)")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    code = ("import sys; from app import shapes, gpucheck; "
            "shapes.build_random_model(sys.argv[1], sys.argv[2], dtype='bfloat16'); gpucheck.sharpen(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp), shape], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AppError(last_error((proc.stderr + proc.stdout).splitlines()))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


SHARP_LOGIT = 20.0  # the logit of the "copy" token in a sharpened model, like a real model's confident ones


def sharpen(folder):
    """Give the random model decisive predictions, as a trained model has: embeddings of unit scale (they
    then dominate the residual stream over the random layers' small outputs) and an untied LM head that is
    the embedding matrix scaled so the current token scores about SHARP_LOGIT against ~1 for the others.
    A plain random model's 128k logits are near-ties, which q4_k_m's rounding reorders: the smoke test's
    top-1 and greedy gates for q4_k_m then fail (measured: top-1 66.7% < 75%, greedy 2% < 15%) for reasons
    that say nothing about the GPU path. Shapes, dtypes, speed and memory are unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    shards = sorted(folder.glob("*.safetensors"))
    embed = None
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                embed = f.get_tensor("model.embed_tokens.weight")
    if embed is None:
        raise AppError(f"{folder} has no model.embed_tokens.weight to sharpen")
    dtype = embed.dtype
    unit = (embed.float() / embed.float().std()).to(dtype)
    head = (unit.float() * (SHARP_LOGIT / config["hidden_size"])).to(dtype)
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        if "model.embed_tokens.weight" in tensors:
            tensors["model.embed_tokens.weight"] = unit
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"] = head.clone()
        save_file(tensors, str(shard), metadata=metadata or {"format": "pt"})


def shape_summary(model: Path) -> dict:
    c = json.loads((model / "config.json").read_text())
    from app.memory import Architecture
    arch = Architecture.from_config(c)
    return {"hidden": c["hidden_size"], "layers": c["num_hidden_layers"], "vocab": c["vocab_size"],
            "params": arch.params, "linear_params": arch.linear_params}


def write_recipe(path: Path, model: Path, dry_run: bool) -> Path:
    """tiny's data and LoRA settings with the shape's model: 10 DPO steps of batch 2 at max_length 512, 4-bit,
    no evaluation during training, a few held-out pairs and two probes (smoke reads them), GGUF f16 + q4_k_m.
    The reference log-probs are scored up front, as a real recipe's 20,000 pairs make `auto` choose: that
    pass (its batch from the planner, its progress) runs here too."""
    path.write_text(f"""# written by app/gpucheck.py: the GPU check's recipe (see its docstring)
base: tiny
model: {{name: {model}, load_in_4bit: true, dtype: {'bfloat16' if dry_run else 'null'}, max_seq_length: 512,
        params: null}}
data: {{eval_share: 0.05, eval_pairs: 8}}
dpo: {{max_steps: {STEPS}, per_device_train_batch_size: 2, gradient_accumulation_steps: 1, max_length: 512,
       eval_strategy: "no", save_steps: 1000, logging_steps: 1, warmup_steps: 1, learning_rate: 1.0e-4,
       per_device_eval_batch_size: 4, precompute_ref_log_probs: true}}
export: {{gguf: [{', '.join(GGUF)}], probes: ["What is the sun?", "Tell me about bees."]}}
""")
    return path


def run_logged(argv, log_path: Path, env: dict, timeout: float, echo) -> dict:
    """argv to completion (or killed at `timeout` seconds); its output, stdout and stderr together, into
    log_path and to `echo` line by line; lines as (seconds since start, text)."""
    t0 = time.time()
    lines = []
    with open(log_path, "w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
        timer = threading.Timer(timeout, lambda: _kill(proc))
        timer.start()
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append((time.time() - t0, line))
                f.write(line + "\n")
                echo(line)
            proc.wait()
        finally:
            timer.cancel()
    timed_out = proc.returncode < 0 and time.time() - t0 >= timeout
    return {"rc": proc.returncode, "wall_s": time.time() - t0, "lines": lines, "timed_out": timed_out}


def _kill(proc):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)  # its own session: the converter, a grandchild, goes too


ERROR_LINE = re.compile(r"^(error: |[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b|RuntimeError|AssertionError)")


def last_error(lines) -> str:
    """The line that says what went wrong: the app's `error: ...` (AppError), else a traceback's last
    exception line, else the last non-empty line."""
    texts = [t.strip() for t in lines if t and t.strip()]
    app_error = [t for t in texts if t.startswith("error: ")]
    if app_error:
        return app_error[-1][len("error: "):]
    exceptions = [t for t in texts if ERROR_LINE.match(t)]
    return (exceptions or texts or ["no output"])[-1][:400]


CAUSES = [("bitsandbytes", ("bitsandbytes", "bnb", "4bit", "4-bit", "nf4", "Linear4bit", "quant_state")),
          ("CUDA", ("CUDA", "cuda", "cuDNN", "cudnn", "cuBLAS", "cublas", "NVIDIA", "nvrtc", "triton", "Triton",
                    "out of memory", "sm_")),
          ("bf16", ("bf16", "bfloat16", "BFloat16")),
          ("versions", ("No module named", "cannot import", "ImportError", "version", "requires",
                        "has no attribute", "unexpected keyword", "is not installed", " pins "))]


def failure_sentence(events: list[dict], lines: list[str]) -> str:
    """One sentence: the stage that failed (the pipeline's progress events), what kind of problem it looks
    like, and its last error line (the printed `lines`)."""
    stage, error = last_stage(events) or "startup", last_error(lines)
    cause = next((name for name, words in CAUSES if any(w in error for w in words)), None)
    return f"the {stage} stage failed{f' ({cause})' if cause else ''}: {error.rstrip('.')}"


def figures(run: Path, recipe_path: Path, dry_run: bool) -> dict:
    """Tokens/s, peak memory against the planner, the smoke verdicts: what the run folder holds."""
    found = {}
    rows = read_metrics(run)
    if rows:
        speeds = [r["tokens_per_second"] for r in rows if "loss" in r and r.get("tokens_per_second")]
        found["tokens_per_second"] = round(statistics.median(speeds), 1) if speeds else None
        found["tokens_per_second_steps"] = speeds
        found["losses"] = [round(r["loss"], 4) for r in rows if "loss" in r]
    t = read_json(run / "train.json")
    if t:
        found.update(train_seconds=t.get("train_seconds"), steps_done=t.get("steps"))
        found["peak_memory_gib"] = t.get("peak_memory_gb")
        found["peak_memory_kind"] = "peak RSS of the process (CPU)" if dry_run else "torch.cuda.max_memory_allocated"
    try:
        from app.memory import estimate_training_memory
        from app.recipe import load_recipe
        est = estimate_training_memory(load_recipe(str(recipe_path)))
        found["estimate_gib"] = round(est.total, 2)
        found["estimate"] = est.summary()
        if found.get("peak_memory_gib") and not dry_run:
            found["measured_over_estimate"] = round(found["peak_memory_gib"] / est.total, 2)
    except Exception as e:  # the planner's own failure is a finding, not a crash of the check
        found["estimate_error"] = f"{type(e).__name__}: {e}"
    smoke = read_json(run / "smoke.json")
    if smoke:
        found["smoke"] = [{k: r.get(k) for k in ("file", "type", "passed", "reason", "top1_agreement", "seconds")}
                          for r in smoke["results"]]
    return found


ARTIFACTS = ("train.json", "metrics.jsonl", "smoke.json", "recipe.yaml", "report.md", "preference_eval.json")


def keep_artifacts(run: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ARTIFACTS:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)
    return dest


def restore_latest(latest: Path, old: str | None, run: Path | None):
    """exports/latest back to where it was, if the check's run moved it (the pipeline marks a run that passed
    its smoke test); a move by another run in the meantime is left alone."""
    now = os.readlink(latest) if latest.is_symlink() else None
    if run is None or now is None or Path(now).name != run.name:
        return
    latest.unlink(missing_ok=True)
    if old is not None:
        latest.symlink_to(old)


def finish(report: dict, out: Path | None, log, t0: float, reason: str | None) -> dict:
    report["result"], report["reason"] = ("PASS", None) if reason is None else ("FAIL", reason)
    report["wall_s"] = round(time.time() - t0, 1)
    report["host"]["load_at_end"] = os.getloadavg()
    for line in summary_lines(report):
        log(line)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"report: {out}")
    return report


def summary_lines(r: dict) -> list[str]:
    lines = [""]
    if r.get("tokens_per_second") is not None:
        steps = r["tokens_per_second_steps"]
        lines.append(f"tokens/s: {r['tokens_per_second']:,.0f} (median of {len(steps)} logged steps; "
                     f"{min(steps):,.0f} to {max(steps):,.0f})")
    if r.get("peak_memory_gib") is not None:
        if r["dry_run"]:
            lines.append(f"memory: peak RSS {r['peak_memory_gib']:.2f} GiB on the CPU; the planner's GPU estimate for "
                         f"this recipe is {r.get('estimate_gib', '?')} GiB (not comparable on a CPU)")
        else:
            ratio = r.get("measured_over_estimate")
            lines.append(f"GPU memory: peak {r['peak_memory_gib']:.2f} GiB allocated against the planner's "
                         f"{r.get('estimate_gib', '?')} GiB estimate" + (f" ({ratio:.2f}x)" if ratio else "")
                         + (f"; {r['estimate']}" if r.get("estimate") else ""))
    if r.get("attention"):
        lines.append(f"attention: {r['attention']['summary']}")
    if r.get("llama_cpp"):
        lines.append(f"llama.cpp: {r['llama_cpp']['summary']}")
    if r.get("smoke"):
        lines.append("smoke: " + ", ".join(f"{s['type']} {'passed' if s['passed'] else 'FAILED: ' + str(s['reason'])}"
                                           for s in r["smoke"]))
    if r.get("pipeline"):
        lines.append("stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["pipeline"]["stages"].items()))
    lines.append(f"{r['result']}" + (f": {r['reason']}" if r["reason"] else "")
                 + f"  ({r['wall_s']:.0f}s{', dry run on the CPU' if r['dry_run'] else ''})")
    return lines


def format_versions(v: dict) -> str:
    return ", ".join(f"{k} {v[k]}" for k in v if v[k])
