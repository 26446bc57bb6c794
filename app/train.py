"""The train stage: TRL's DPOTrainer on the Unsloth model; the reference is the base with adapters off.

Everything TRL logs goes to metrics.jsonl in the run folder, one JSON object per logging step, and one
console line per logging step says step, loss, reward accuracy, margin, tokens/s and peak memory.
"""
import json
import math
import resource
import sys
import time
from pathlib import Path

from transformers import PrinterCallback, TrainerCallback

from app import AppError
from app.evaluate import (generate_replies, held_out_pairs, score_pairs_hf, summarize_scores,
                          unsloth_inference)
from app.runs import write_json, write_text


def train_dpo(model, tokenizer, data, recipe, run: Path, resume_from: Path | None = None) -> dict:
    """Train in place; write metrics.jsonl and adapter/ into `run`; return a summary dict. With
    `resume_from` (a checkpoint of this run), Trainer restores adapter, optimizer, scheduler and RNG
    states and goes on from its step; metrics logged after that step are dropped first (they are redone)."""
    import torch
    from trl import DPOConfig, DPOTrainer

    on_gpu = torch.cuda.is_available()
    args = DPOConfig(**{
        "output_dir": str(run / "checkpoints"), "report_to": "none", "disable_tqdm": True,  # our bar, our lines
        "include_num_input_tokens_seen": "non_padding", "save_total_limit": 2,
        "bf16": on_gpu and torch.cuda.is_bf16_supported(), "fp16": on_gpu and not torch.cuda.is_bf16_supported(),
        **recipe.dpo})
    log = MetricsLog(run / "metrics.jsonl")
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data.train,
                         eval_dataset=data.eval, processing_class=tokenizer, callbacks=[log])
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; MetricsLog prints one line per log

    # before: LoRA B starts at zero, so the model is still the base model
    probes = recipe.export["probes"]
    pairs, too_long = ([], 0) if data.eval is None else held_out_pairs(
        trainer.eval_dataset, recipe.data["eval_pairs"], args.max_length)
    with unsloth_inference(model):
        before = generate_replies(model, tokenizer, probes)
        base_scores = score_pairs_hf(model, pairs)
    if resume_from:
        keep_metrics_until(run / "metrics.jsonl", checkpoint_step(resume_from))
        # PEFT saves the trained adapter at the checkpoint's root and TRL's frozen "ref" copy in ref/; when a
        # checkpoint has adapter sub-folders Trainer loads only those (transformers#30505), so the trained
        # adapter would silently restart from its initial weights. Load it here; Trainer then loads ref/.
        model.load_adapter(str(resume_from), model.active_adapter, is_trainable=True)
    elif data.eval is not None:
        trainer.evaluate()  # TRL's eval metrics at step 0: where the eval curves start

    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if log.bad_step is not None:
        good = last_checkpoint(run)
        raise AppError(f"training stopped at step {log.bad_step}: the loss is {log.bad_value}; the last good "
                       f"checkpoint is {good.relative_to(run) if good else 'none (none was saved yet)'} "
                       f"(lower dpo.learning_rate, or check the data)")
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    final_eval = {}
    if data.eval is not None:  # reuse the eval of the last step when there was one
        final_eval = evals[-1] if evals and evals[-1]["step"] == result.global_step else trainer.evaluate()

    # after
    with unsloth_inference(model):
        after = generate_replies(model, tokenizer, probes)
        trained_scores = score_pairs_hf(model, pairs)
    preference = {"base": summarize_scores(base_scores),
                  "trained": summarize_scores(trained_scores, base_scores, args.beta), "left_out_too_long": too_long}
    write_json(run / "preference_eval.json", {**preference, "beta": args.beta, "pairs": [
        {**p, "base": b, "trained": t} for p, b, t in zip(pairs, base_scores, trained_scores)]})

    model.save_pretrained(str(run / "adapter"))
    tokenizer.save_pretrained(str(run / "adapter"))
    return {
        "steps": result.global_step, "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
        "train_loss": result.training_loss, "eval": {k: v for k, v in final_eval.items() if k.startswith("eval_")},
        "preference": preference, "peak_memory_gb": peak_memory_gb(),
        "data": {"source": data.source, "format": data.format, "rows": data.rows, "dropped": data.dropped,
                 "train": len(data.train), "eval": 0 if data.eval is None else len(data.eval)},
        "replies": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(probes, before, after)],
    }


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def last_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint: Trainer writes trainer_state.json last, so a checkpoint cut short
    by a crash has none and is passed over."""
    done = [c for c in (run / "checkpoints").glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    return max(done, key=checkpoint_step, default=None)


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

    def __init__(self, path: Path):
        self.path = path
        self.bar, self.bad_step, self.bad_value = None, None, None
        self.last_time, self.last_tokens, self.start = None, 0, None

    def on_train_begin(self, args, state, control, **kw):
        from tqdm.auto import tqdm
        self.start = self.last_time = time.time()
        self.last_tokens = state.num_input_tokens_seen  # not 0 when resuming from a checkpoint
        self.bar = tqdm(total=state.max_steps, desc="dpo", unit="step", file=sys.stderr,
                        disable=not sys.stderr.isatty(), leave=False)

    def on_step_end(self, args, state, control, **kw):
        if self.bar:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        now = time.time()
        tokens = state.num_input_tokens_seen
        if "loss" in logs:
            logs["tokens_per_second"] = round((tokens - self.last_tokens) / max(now - self.last_time, 1e-9), 1)
            logs["peak_memory_gb"] = peak_memory_gb()
            self.last_time, self.last_tokens = now, tokens
            if not math.isfinite(logs["loss"]):
                self.bad_step, self.bad_value = state.global_step, logs["loss"]
                control.should_training_stop = True
        record = {"step": state.global_step, "time": round(now - (self.start or now), 2), **logs}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        line = format_log_line(record, state.max_steps)
        if line:
            (self.bar.write if self.bar else print)(line)

    def on_train_end(self, args, state, control, **kw):
        if self.bar:
            self.bar.close()


def format_log_line(r: dict, max_steps: int) -> str | None:
    if "loss" in r:
        return (f"step {r['step']:>4}/{max_steps} | loss {r['loss']:.4f} | acc {r.get('rewards/accuracies', 0):.2f}"
                f" | margin {r.get('rewards/margins', 0):+.3f} | {r['tokens_per_second']:,.0f} tok/s"
                f" | peak {r['peak_memory_gb']:.2f} GB | {r['time']:.0f}s")
    if "eval_loss" in r:
        return (f"eval at step {r['step']} | loss {r['eval_loss']:.4f} | acc "
                f"{r.get('eval_rewards/accuracies', 0):.2f} | margin {r.get('eval_rewards/margins', 0):+.3f}")
    return None
