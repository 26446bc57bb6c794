"""The train stage: TRL's trainers on the Unsloth model, one path for every method.

sft, dpo, orpo and kto train the LoRA of a causal LM (DPO's and KTO's reference is the same model with
adapters off); reward trains a sequence-classification head with LoRA. Everything TRL logs goes to
metrics.jsonl in the run folder, one JSON object per logging step, and one console line per logging
step says step, loss, the method's accuracy and margin, tokens/s and peak memory. For the causal LMs the
held-out preference pairs are scored before and after (app/evaluate.py), whatever the method.
"""
import functools
import importlib.util
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

from transformers import PrinterCallback, TrainerCallback

from app import AppError
from app.alarms import MAX_PAIRS, data_alarms, length_alarms, reward_alarms, reward_trend, training_alarms
from app.evaluate import (held_out_pairs, preference_headline, score_pairs_hf, score_pairs_reward, summarize_scores,
                          unsloth_inference)
from app.generate import Sampling, TransformersModel
from app.model import local_model_folder
from app.rewards import load_rewards
from app.methods import METHODS
from app.recipe import trl_config_default
from app.progress import Progress
from app.refcache import attach_reference_log_probs, reference_line
from app.runs import ACCURACY_KEYS, MARGIN_KEYS, checkpoint_step, last_checkpoint, read_metrics, write_json, write_text

PROBE_SAMPLING = Sampling(max_tokens=64)  # the probes' replies before and after training: greedy, 64 tokens


def make_trainer(method: str, model, tokenizer, data, recipe, run: Path, callbacks):
    """The method's TRL trainer, its config built from the recipe's section of the same name."""
    import torch

    spec = METHODS[method]
    config_class, trainer_class = spec.classes()
    # TRL's own defaults wherever Unsloth's generated config on a GPU would put its own, so that one recipe
    # trains alike on the CPU and on a GPU; the recipe's values win
    fields = {**trl_defaults_unsloth_replaces(method), **recipe.methods[method]}
    if method == "dpo" and recipe.model.full_finetuning:
        # no adapter to turn off: the reference is TRL's own, a second copy of the weights that it loads
        # (precompute_ref_log_probs false) or one pass of the starting weights before training (true, auto).
        # Launched (app/launch.py), the copy: TRL's pass caches the log-probs of an in-memory dataset in a
        # temporary folder of rank 0's, which the other ranks then fail to open
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        fields["precompute_ref_log_probs"] = fields.get("precompute_ref_log_probs", "auto") is not False and not launched
    elif method == "dpo":  # app/refcache.py scores the reference once and hands TRL its columns (see train())
        fields["precompute_ref_log_probs"] = False
    args = config_class(**{
        "output_dir": str(run / "checkpoints"), "report_to": "none", "disable_tqdm": True,  # our bar, our lines
        # online methods generate their inputs: Trainer cannot count them (it warns at every step)
        "include_num_input_tokens_seen": "no" if spec.online else "non_padding", "save_total_limit": 2,
        **mixed_precision(torch.cuda.is_available(), model.dtype), **fields})
    extra = {"ref_model": None} if spec.reference else {}
    if spec.online:  # they sample replies to the prompts and learn from these scores (a beta > 0 makes
        # the model with adapters off their reference, as DPO's)
        extra["reward_funcs"], extra["reward_processing_classes"] = load_rewards(recipe)
    trainer = trainer_class(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                            processing_class=tokenizer, callbacks=callbacks, **extra)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; MetricsLog prints one line per log
    return trainer


def mixed_precision(on_gpu: bool, model_dtype) -> dict:
    """Pure: Trainer's bf16/fp16 flags for the dtype the model was loaded in. Unsloth loads in bfloat16 where
    the GPU computes it natively and in float16 elsewhere (a T4, sm_75, has bfloat16 only through emulation,
    which torch.cuda.is_bf16_supported() counts as support), and its trainer refuses bf16 on a float16 model.
    None on the CPU."""
    import torch
    half = on_gpu and model_dtype in (torch.bfloat16, torch.float16)
    return {"bf16": half and model_dtype == torch.bfloat16, "fp16": half and model_dtype == torch.float16}


def trl_defaults_unsloth_replaces(method: str) -> dict:
    """{field: TRL's default} for the fields whose defaults Unsloth's generated config replaces on a GPU
    (unsloth/models/rl.py's `replacements`: weight_decay 0.001, learning_rate 5e-5, seed 3407, eval batch 4,
    eval accumulation 2, ...), read from both libraries' installed source; those whose TRL default is not a
    plain value (optim's is computed) are left out."""
    from app.recipe import trl_config_fields

    out = {}
    for name in unsloth_replaced_fields() & trl_config_fields(method):
        try:
            out[name] = trl_config_default(method, name)
        except (KeyError, ValueError):
            pass
    return out


@functools.cache
def unsloth_replaced_fields() -> set[str]:
    """The keys of the `replacements` dicts in unsloth/models/rl.py (the defaults its generated configs put),
    parsed rather than imported: on a CPU that module never runs."""
    import ast

    spec = importlib.util.find_spec("unsloth")
    source = Path(spec.origin).parent / "models" / "rl.py"
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "replacements" for t in node.targets) \
                and isinstance(node.value, ast.Dict):
            names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return names - {"output_dir", "report_to", "bf16", "fp16", "include_num_input_tokens_seen"}  # set by make_trainer


def train(method: str, model, tokenizer, data, recipe, run: Path, resume_from: Path | None = None,
          progress: Progress | None = None) -> dict | None:
    """Train in place; write metrics.jsonl, preference_eval.json and adapter/ into `run`; return a summary
    (None on a rank other than 0 of a launched run, app/launch.py: it trains, saves with the others, and stops).
    With `resume_from` (a checkpoint of this run), Trainer restores adapter, optimizer, scheduler and RNG
    states and goes on from its step; metrics logged after that step are dropped first (they are redone).
    `progress` times the evaluation before and after apart from the training (app/progress.py)."""
    progress = progress or Progress()
    log = MetricsLog(run / "metrics.jsonl", method)
    # report_to: tensorboard writes into the run: transformers 5 has no logging_dir, and its callback, first
    # called by the step-0 evaluation, would write to ./runs/ in the current directory
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run / "tensorboard")
    trainer = make_trainer(method, model, tokenizer, data, recipe, run, [log])
    # under accelerate launch (app/launch.py) every rank trains; rank 0 alone measures and writes
    main, full = trainer.is_world_process_zero(), recipe.model.full_finetuning
    reference = None
    if method == "dpo" and full:
        reference = full_finetuning_reference(trainer)
    elif method == "dpo":  # from the cache, scored once, or in every step (precompute_ref_log_probs)
        with progress.stage("reference"):
            reference = attach_reference_log_probs(trainer, recipe, local_model_folder(recipe.model.name))
    if reference and main:
        print(reference_line(reference))
    args, causal = trainer.args, METHODS[method].chat_model
    # sft has none: its margins are reported at DPO's default beta (reward accuracy does not depend on it)
    beta = getattr(args, "beta", None) or trl_config_default("dpo", "beta")

    # before: LoRA B starts at zero (or nothing trained yet), so the model is still the base (reward: a random head)
    probes = recipe.export.probes if causal else []
    pairs, too_long = held_out_pairs(data.pairs, tokenizer, recipe.data.eval_pairs, getattr(args, "max_length", None))
    score = score_pairs_hf if causal else score_pairs_reward
    before, base_scores = [], []
    if main:
        with progress.stage("evaluation"), unsloth_inference(model) if causal else _no_grad():
            before = TransformersModel(model, tokenizer).replies_to(probes, PROBE_SAMPLING)
            base_scores = score(model, pairs)
    if resume_from:
        if main:
            keep_metrics_until(run / "metrics.jsonl", checkpoint_step(resume_from))
        if not full:  # full fine-tuning: Trainer loads the checkpoint's weights itself
            # PEFT saves the trained adapter at the checkpoint's root and TRL's frozen "ref" copy in ref/; when a
            # checkpoint has adapter sub-folders Trainer loads only those (transformers#30505), so the trained
            # adapter would silently restart from its initial weights. Load it here; Trainer then loads ref/.
            # autocast_adapter_dtype=False: keep the dtype the trainer gave the adapter (TRL trains a 4-bit
            # model's LoRA in bfloat16, QLoRA's recipe); PEFT's default would upcast it to float32 and the
            # resumed run would take other steps than the uninterrupted one
            model.load_adapter(str(resume_from), model.active_adapter, is_trainable=True, autocast_adapter_dtype=False)
    # TRL's eval metrics at step 0, where the eval curves start: inside train(), after accelerate wraps the
    # model (an evaluate() called before it leaves a launched run's model unwrapped: every rank then trains
    # on its own shard without DDP's gradient sync; measured on 2 CPU processes)
    trainer.args.eval_on_start = data.eval is not None and not resume_from

    with progress.stage("training"):
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if log.bad_step is not None:
        good = last_checkpoint(run)
        raise AppError(f"training stopped at step {log.bad_step}: the loss is {log.bad_value}; the last good "
                       f"checkpoint is {good.relative_to(run) if good else 'none (none was saved yet)'} "
                       f"(lower {method}.learning_rate, or check the data)")
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    final_eval = {}
    if data.eval is not None:  # reuse the eval of the last step when there was one
        final_eval = evals[-1] if evals and evals[-1]["step"] == result.global_step else trainer.evaluate()

    if trainer.args.world_size > 1:  # every rank takes part (FSDP, DeepSpeed gather the weights); rank 0 writes
        trainer.save_model(str(run / ("merged" if full else "adapter")))
    if not main:
        return None

    # after
    with progress.stage("evaluation"), unsloth_inference(model) if causal else _no_grad():
        after = TransformersModel(model, tokenizer).replies_to(probes, PROBE_SAMPLING)
        trained_scores = score(model, pairs)
    # DPO's implicit reward is measured against the base's log-probs; a reward model's scores are rewards already
    preference = {"base": summarize_scores(base_scores),
                  "trained": summarize_scores(trained_scores, base_scores if causal else None, beta),
                  "left_out_too_long": too_long, "beta": beta if causal else None}
    write_json(run / "preference_eval.json", {**preference, "beta": beta, "method": method, "pairs": [
        {**p, "base": b, "trained": t} for p, b, t in zip(pairs, base_scores, trained_scores)]})

    if not full and trainer.args.world_size == 1:  # a fully fine-tuned model is saved by the export, in 16 bits
        model.save_pretrained(str(run / "adapter"))
        tokenizer.save_pretrained(str(run / "adapter"))
    records = log.records()
    return {
        "alarms": run_alarms(method, records, result.global_step, args, data, tokenizer, before, after),
        "method": method, "steps": result.global_step, "reference": reference,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
        "train_loss": result.training_loss, "eval": {k: v for k, v in final_eval.items() if k.startswith("eval_")},
        "preference": preference, "peak_memory_gb": peak_memory_gb(),
        "data": {"source": data.source, "format": data.format, "rows": data.rows, "dropped": data.dropped,
                 "train": len(data.train), "eval": 0 if data.eval is None else len(data.eval)},
        "replies": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(probes, before, after)],
        "reward_trend": reward_trend(records) if METHODS[method].online else None,
    }


def full_finetuning_reference(trainer) -> dict:
    """What TRL does for DPO's reference in full fine-tuning (see make_trainer), in app/refcache.py's words."""
    if trainer.precompute_ref_logps:
        return {"setting": True, "precomputed": True, "cached": [], "scored": [], "seconds": 0.0,
                "why": "full fine-tuning: TRL scored the starting weights once, so no second copy is kept"}
    return {"setting": False, "precomputed": False, "cached": [], "scored": [], "seconds": 0.0,
            "why": "full fine-tuning with precompute_ref_log_probs false: TRL keeps a frozen copy of the weights"}


def run_alarms(method, records: list[dict], steps: int, args, data, tokenizer, before, after) -> list[dict]:
    """app.alarms over this run: its logged metrics, its first training pairs as text, the token counts of
    its probe replies and of the replies its data asks for (chosen, or desirable completions)."""
    loss_type = getattr(args, "loss_type", "sigmoid")
    sigmoid = (loss_type if isinstance(loss_type, list) else [loss_type]) == ["sigmoid"]
    rows = data.train.select(range(min(len(data.train), MAX_PAIRS))) if data.train is not None else []
    pairs, targets = [], []
    for row in rows:
        if "chosen" in row and "prompt" in row:
            users = [m["content"] for m in row["prompt"] if m["role"] == "user"]
            pairs.append((users[-1] if users else "", row["chosen"][-1]["content"], row["rejected"][-1]["content"]))
            targets.append(row["chosen"][-1]["content"])
        elif "completion" in row and row.get("label", True):
            targets.append(row["completion"][-1]["content"])
    if not targets and data.pairs is not None:  # grpo, rloo train on prompts: the held-out pairs say what is asked
        targets = [row["chosen"][-1]["content"] for row in data.pairs]

    def tokens(texts):
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []
    return (training_alarms(method, records, steps, sigmoid) + reward_alarms(records) + data_alarms(pairs)
            + length_alarms(tokens(before), tokens(after), tokens(targets[:1000])))


def _no_grad():
    import torch
    return torch.no_grad()


def keep_metrics_until(path: Path, step: int):
    """Drop the records logged after `step` (the resumed run logs those steps again), atomically."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        write_text(path, "".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))


def peak_memory_gb() -> float:
    import torch
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # peak RSS, KiB -> GiB


class MetricsLog(TrainerCallback):
    """Appends every log to metrics.jsonl, prints one line per logging step, owns the progress bar."""

    def __init__(self, path: Path, method: str = "dpo"):
        self.path, self.method = path, method
        self.bar, self.bad_step, self.bad_value = None, None, None
        self.last_tokens, self.start = 0, None
        # seconds spent in training steps only: evaluation and checkpoints between logs are not counted
        self.step_seconds, self.step_began, self.last_step_seconds = 0.0, None, 0.0

    def on_train_begin(self, args, state, control, **kw):
        from tqdm.auto import tqdm
        self.start = time.time()
        self.last_tokens = state.num_input_tokens_seen  # not 0 when resuming from a checkpoint
        self.bar = tqdm(total=state.max_steps, desc=self.method, unit="step", file=sys.stderr,
                        disable=not sys.stderr.isatty() or not state.is_world_process_zero, leave=False)

    def on_step_begin(self, args, state, control, **kw):
        self.step_began = time.time()

    def on_step_end(self, args, state, control, **kw):
        if self.step_began is not None:
            self.step_seconds += time.time() - self.step_began
        if self.bar:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        now = time.time()
        tokens = state.num_input_tokens_seen
        if "loss" in logs:
            seconds = self.step_seconds - self.last_step_seconds
            logs["tokens_per_second"] = round((tokens - self.last_tokens) / max(seconds, 1e-9), 1)
            logs["peak_memory_gb"] = peak_memory_gb()
            self.last_step_seconds, self.last_tokens = self.step_seconds, tokens
            if not math.isfinite(logs["loss"]):  # on every rank: the logged loss is their mean
                self.bad_step, self.bad_value = state.global_step, logs["loss"]
                control.should_training_stop = True
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "time": round(now - (self.start or now), 2), **logs}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        line = format_log_line(record, state.max_steps)
        if line:
            (self.bar.write if self.bar else print)(line)

    def on_train_end(self, args, state, control, **kw):
        if self.bar:
            self.bar.close()

    def records(self) -> list[dict]:
        return read_metrics(self.path.parent)


def format_log_line(r: dict, max_steps: int) -> str | None:
    def first(keys, prefix=""):
        return next((r[prefix + k] for k in keys if prefix + k in r), None)

    def extras(prefix=""):
        acc, margin, reward = first(ACCURACY_KEYS, prefix), first(MARGIN_KEYS, prefix), r.get(prefix + "reward")
        return ((f" | acc {acc:.2f}" if acc is not None else "") + (f" | margin {margin:+.3f}" if margin is not None else "")
                + (f" | reward {reward:+.3f}" if reward is not None else ""))  # grpo, rloo: the mean of the samples

    if "loss" in r:
        speed = f" | {r['tokens_per_second']:,.0f} tok/s" if r["tokens_per_second"] else ""  # ORPO counts none
        return (f"step {r['step']:>4}/{max_steps} | loss {r['loss']:.4f}{extras()}{speed}"
                f" | peak {r['peak_memory_gb']:.2f} GB | {r['time']:.0f}s")
    if "eval_loss" in r:
        return f"eval at step {r['step']} | loss {r['eval_loss']:.4f}{extras('eval_')}"
    return None


def training_summary_lines(s: dict) -> list[str]:
    """What the console says after training: held-out accuracy, the method's held-out loss, probe replies."""
    method, pref = s.get("method", "dpo").upper(), s["preference"]
    headline = preference_headline(pref["base"], pref["trained"], s.get("method", "dpo"), pref.get("beta"))
    lines = [headline] if headline else []
    lines += [f"ALARM ({a['name']}): {a['message']}; fix: {a['fix']}" for a in s.get("alarms", [])]
    ev = s["eval"]
    acc = next((ev[f"eval_{k}"] for k in ACCURACY_KEYS if f"eval_{k}" in ev), None)
    margin = next((ev[f"eval_{k}"] for k in MARGIN_KEYS if f"eval_{k}" in ev), None)
    if ev:
        lines.append(f"held-out {method} loss {ev.get('eval_loss', 0):.4f}"
                     + (f", accuracy {acc:.2f}" if acc is not None else "")
                     + (f", margin {margin:+.3f}" if margin is not None else ""))
    trend = s.get("reward_trend")
    if trend:
        lines.append(f"mean reward of the sampled replies: {trend['first']:+.3f} over steps {trend['first_steps'][0]}-"
                     f"{trend['first_steps'][1]} -> {trend['last']:+.3f} over steps {trend['last_steps'][0]}-"
                     f"{trend['last_steps'][1]}")
    for r in s["replies"]:
        lines.append(f"prompt: {r['prompt']}\n  before {method}: {r['before']}\n  after {method}:  {r['after']}")
    return lines
