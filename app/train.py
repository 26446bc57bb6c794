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


def train_dpo(model, tokenizer, data, recipe, run: Path) -> dict:
    """Train in place; write metrics.jsonl and adapter/ into `run`; return a summary dict."""
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

    probes = recipe.export["probes"][:2]
    before = generate_replies(model, tokenizer, probes)
    result = trainer.train()
    if log.bad_step is not None:
        raise AppError(f"training stopped at step {log.bad_step}: the loss is {log.bad_value} "
                       f"(lower dpo.learning_rate, or check the data)")
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    final_eval = {}
    if data.eval is not None:  # reuse the eval of the last step when there was one
        final_eval = evals[-1] if evals and evals[-1]["step"] == result.global_step else trainer.evaluate()
    after = generate_replies(model, tokenizer, probes)

    model.save_pretrained(str(run / "adapter"))
    tokenizer.save_pretrained(str(run / "adapter"))
    return {
        "steps": result.global_step, "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
        "train_loss": result.training_loss, "eval": {k: v for k, v in final_eval.items() if k.startswith("eval_")},
        "peak_memory_gb": peak_memory_gb(), "replies": [{"prompt": p, "before": b, "after": a}
                                                        for p, b, a in zip(probes, before, after)],
    }


def generate_replies(model, tokenizer, prompts, max_new_tokens=64) -> list[str]:
    """Greedy replies through the chat template (used to show the model before and after training)."""
    import torch
    from unsloth import FastLanguageModel

    FastLanguageModel.for_inference(model)
    replies = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    FastLanguageModel.for_training(model)
    return replies


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
