"""DPO training speed: the app's Unsloth path against plain transformers + PEFT + TRL, same model, same data.

    .venv/bin/python bench/dpo_speed.py --shape tiny                   # CPU: proves the script, not Unsloth
    python bench/dpo_speed.py --shape llama-1b                         # GPU: max_length 1024 and 2048
    python bench/dpo_speed.py --shape llama3-8b --max-length 1024      # GPU: one length per call
    .venv/bin/python bench/dpo_speed.py --arms unsloth --lever padding_free=true   # a speed lever, A/B

Arms, each in its own process, alternating A B A B so that drift (heat, other load) hits both alike:
  unsloth   app.model.load_model (Unsloth imported first, LoRA with use_gradient_checkpointing="unsloth")
  baseline  transformers AutoModelForCausalLM (bitsandbytes 4-bit NF4 on CUDA), standard non-reentrant
            gradient checkpointing, PEFT get_peft_model; Unsloth is never imported in that process
  unsloth+KEY=VALUE  (--lever KEY=VALUE) the app's path with one more DPOConfig field: a speed lever, measured
            against plain `unsloth` in the same alternation; kept in the app only where it pays
Both get the same LoRA (r 16, alpha 16, all seven projections), the same trl.DPOConfig (built as app/train.py
builds it: ref_model=None, so the reference is the policy with adapters off), the same rows through
app.data, the same batch size, max_length and steps. The model is random-initialised from a config and
saved once (bf16 on GPU, float32 on CPU like the tiny recipe); the tokenizer is the tiny model's
SentencePiece one (token ids stay below 1k; the embedding and lm_head keep the shape's full vocabulary).
Figures are taken after --warmup steps: tokens/s counts the non-padding tokens of the chosen and the
rejected sequences (prompt included) through the policy, i.e. Trainer's num_input_tokens_seen.
MFU = tokens/s x 6N / peak, N = matmul parameters (lm_head in, embedding lookup out): 2N policy forward,
2N policy backward (input gradients only: the base is frozen, LoRA's own FLOPs are negligible), 2N
reference forward; recomputation for checkpointing and attention-score FLOPs are not counted.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GiB, ROOT, append_section, context, format_table, gpu_name, load_average, run_measured, tail  # noqa: E402

TINY_PREFS = ROOT / "recipes" / "data" / "tiny_prefs.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 16
# model shapes; tiny is app/tiny.py's own, its vocabulary the tokenizer's
SHAPES = {
    "tiny": dict(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, vocab=None, tied=False),
    "llama-1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True),
    "llama3-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tied=False),
}
# dense bf16 peak TFLOPS without sparsity, by the name torch reports (first match wins)
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362)]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--max-length", type=int, nargs="+", help="DPOConfig.max_length, one or more "
                   "(default: 128 for tiny, 1024 and 2048 on GPU)")
    p.add_argument("--batch", type=int, help="per-device batch size in pairs (default 8 tiny, 2 GPU)")
    p.add_argument("--steps", type=int, help="steps per run, warm-up included (default 10 tiny, 20 GPU)")
    p.add_argument("--warmup", type=int, help="first steps left out of the figures (default 2 tiny, 3 GPU)")
    p.add_argument("--rounds", type=int, default=2, help="A B pairs per max_length")
    p.add_argument("--layers", type=int, help="cut the shape to this many decoder layers (per-layer speed and "
                   "memory are the full model's; e.g. --shape llama3-8b --layers 4 fits one short GPU run)")
    p.add_argument("--data", choices=["tiny", "synthetic"], help="tiny: recipes/data/tiny_prefs.jsonl; "
                   "synthetic: pairs that fill max_length (default tiny for tiny, synthetic on GPU)")
    p.add_argument("--arms", nargs="+", choices=["unsloth", "baseline"], default=["unsloth", "baseline"])
    p.add_argument("--lever", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra arm: the app's path with this DPOConfig field set (repeat for more arms)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if its name is not known here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    p.add_argument("--internal", choices=["build", "arm"], help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    tiny = args.shape == "tiny"
    args.max_length = args.max_length or ([128] if tiny else [1024, 2048])
    args.batch = args.batch or (8 if tiny else 2)
    args.steps = args.steps or (10 if tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if tiny else 3)
    args.data = args.data or ("tiny" if tiny else "synthetic")
    if args.steps <= args.warmup:
        p.error("--steps must be more than --warmup")
    if not args.internal:
        args.arms += [f"unsloth+{lever}" for lever in args.lever]
    return args


def lever_fields(arm: str) -> dict:
    """'unsloth+padding_free=true' -> {'padding_free': True}; the plain arms have none."""
    import yaml
    key, _, value = arm.partition("+")[2].partition("=")
    return {key: yaml.safe_load(value)} if key else {}


# --- build: the model and the data, once, shared by every run -------------------------------------------------

def build(args, work: Path):
    """work/model: random Llama of the shape + the tiny tokenizer; work/data.jsonl; work/info.json."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from app.tiny import ensure_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_model()))
    s = dict(SHAPES[args.shape])
    s["vocab"] = s["vocab"] or len(tokenizer)
    s["layers"] = args.layers or s["layers"]
    config = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max(4096, *args.max_length), rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=s["tied"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    dtype = torch.float32 if args.shape == "tiny" else torch.bfloat16  # tiny: as the tiny recipe trains it
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(work / "model"))
    tokenizer.save_pretrained(str(work / "model"))

    head_dim = s["hidden"] // s["heads"]
    per_layer = (2 * s["hidden"] * s["heads"] * head_dim + 2 * s["hidden"] * s["kv_heads"] * head_dim
                 + 3 * s["hidden"] * s["intermediate"])
    info = {**s, "params": sum(p.numel() for p in model.parameters()),
            "matmul_params": s["layers"] * per_layer + s["vocab"] * s["hidden"], "dtype": str(dtype)}
    data = TINY_PREFS if args.data == "tiny" else write_synthetic(work / "data.jsonl", tokenizer, args)
    info["data"] = str(data)
    (work / "info.json").write_text(json.dumps(info))


def write_synthetic(path: Path, tokenizer, args) -> Path:
    """steps x batch pairs whose prompt + reply fill the longest max_length (shorter ones truncate them):
    words of the tiny corpus, so the tokenizer sees ordinary text."""
    import random

    words = (ROOT / "recipes" / "data" / "tiny_corpus.txt").read_text().split()
    rng, length = random.Random(0), max(args.max_length)

    def text(n_tokens):
        ids = tokenizer(" ".join(rng.choices(words, k=n_tokens)), add_special_tokens=False).input_ids[:n_tokens]
        return tokenizer.decode(ids)

    with open(path, "w") as f:
        for _ in range(args.steps * args.batch):
            row = {"prompt": text(length // 4), "chosen": text(length), "rejected": text(length)}
            f.write(json.dumps(row) + "\n")
    return path


# --- one arm: load, train, report ---------------------------------------------------------------------------

def run_arm(args, work: Path):
    if args.arm.startswith("unsloth"):
        from app.model import import_unsloth
        import_unsloth()  # first: it patches transformers, PEFT and TRL on import
    import torch
    from transformers import TrainerCallback

    from app.data import load_preference_data
    from app.recipe import DataSection

    class StepTimer(TrainerCallback):
        """(seconds, tokens seen) at the start of training and at the end of every step."""
        def __init__(self):
            self.marks = []

        def mark(self, state):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # kernels are asynchronous: time what has run, not what was queued
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def on_train_begin(self, args, state, control, **kw):
            self.mark(state)

        def on_step_end(self, args, state, control, **kw):
            self.mark(state)

    info = json.loads((work / "info.json").read_text())
    t0 = time.perf_counter()
    model, tokenizer = (load_unsloth if args.arm.startswith("unsloth") else load_baseline)(args, work / "model")
    load_s = time.perf_counter() - t0
    data = load_preference_data(DataSection(source=info["data"], eval_share=0, seed=0)).train
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the peak of training (the loaded weights stay counted)
    timer = StepTimer()
    trainer = make_trainer(model, tokenizer, data, args, work, timer)
    result = trainer.train()

    (t_a, n_a), (t_b, n_b) = timer.marks[args.warmup], timer.marks[-1]
    out = {"arm": args.arm, "max_length": args.max_length[0], "load_s": load_s,
           "tokens_per_s": (n_b - n_a) / (t_b - t_a), "s_per_step": (t_b - t_a) / (len(timer.marks) - 1 - args.warmup),
           "train_loss": result.training_loss, "steps": result.global_step,
           "unsloth_imported": "unsloth" in sys.modules}
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(), peak_allocated_gib=torch.cuda.max_memory_allocated() / GiB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB)
    if args.arm == "baseline" and out["unsloth_imported"]:
        raise RuntimeError("unsloth was imported in the baseline process")
    (work / f"result-{args.arm}-{args.max_length[0]}.json").write_text(json.dumps(out))


def load_unsloth(args, model_dir: Path):
    """The app's own call: app.model.load_model with the tiny recipe pointed at this model."""
    import torch

    from app.model import load_model
    from app.recipe import load_recipe

    cuda = torch.cuda.is_available()
    recipe = load_recipe("tiny", [
        f"model.name={model_dir}", f"model.max_seq_length={max(args.max_length)}",
        f"model.load_in_4bit={'true' if cuda else 'false'}", f"model.dtype={'null' if cuda else 'float32'}",
        f"lora.r={LORA_R}", f"lora.lora_alpha={LORA_R}", "lora.lora_dropout=0.0"])
    assert recipe.lora.target_modules == TARGETS, "the two arms must adapt the same projections"
    return load_model(recipe, str(model_dir))


def load_baseline(args, model_dir: Path):
    """What a plain QLoRA DPO script does: 4-bit NF4 on CUDA (float32 on CPU), standard checkpointing, PEFT.
    No prepare_model_for_kbit_training: it would upcast lm_head and the norms to float32 (more memory than
    either arm needs), and TRL enables input gradients for PEFT + checkpointing itself."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if torch.cuda.is_available():
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0})
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        use_torch_logprobs()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def use_torch_logprobs():
    """CPU only. TRL 1.15's DPOTrainer scores tokens with a fused LM head whose kernel is Triton, GPU-only
    (on a CPU: "RuntimeError: 0 active drivers"); Unsloth's import swaps in its own kernel, which is why the
    app trains on a CPU at all. The baseline gets the same per-token outputs from full logits in plain torch:
    fine at tiny's vocabulary, and never used on a GPU, where the baseline runs TRL's own kernel."""
    import torch
    import trl.trainer.utils as trl_utils

    class TorchLogProbs:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
            z = torch.nn.functional.linear(hidden, weight, bias) * (1.0 if logit_scale is None else logit_scale)
            if softcap:
                z = softcap * torch.tanh(z / softcap)
            z = z.float() / temperature
            log_z = torch.logsumexp(z, dim=-1)
            log_probs = z.gather(-1, targets[:, None]).squeeze(-1) - log_z
            with torch.no_grad():  # metrics only, as the kernel's extra outputs are used in DPO's sigmoid loss
                probs = torch.softmax(z, dim=-1)
                extra = {"entropy": log_z - (probs * z).sum(-1),
                         "log_sum_sq_probs": torch.logsumexp(2 * z, dim=-1) - 2 * log_z,
                         "mean_logits": z.mean(-1), "is_top1": z.argmax(-1) == targets}
            return (log_probs, *(extra[k] if k in outputs else None
                                 for k in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")))

    trl_utils._ChunkedLogProbFunction = TorchLogProbs


def make_trainer(model, tokenizer, data, args, work: Path, timer):
    """trl.DPOTrainer as app/train.py builds it, for both arms; no eval, no checkpoints, a loss every step."""
    import torch
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    on_gpu = torch.cuda.is_available()
    config = DPOConfig(
        output_dir=str(work / f"out-{args.arm}"), report_to="none", disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        bf16=on_gpu and torch.cuda.is_bf16_supported(), fp16=on_gpu and not torch.cuda.is_bf16_supported(),
        beta=0.1, learning_rate=5e-6, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_length=args.max_length[0], logging_steps=1, save_strategy="no",
        eval_strategy="no", seed=0, **lever_fields(args.arm))
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    return trainer


# --- the parent: build once, alternate the arms, print and record -----------------------------------------------

def child(args, work: Path, *extra) -> list[str]:
    common = ["--shape", args.shape, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--data", args.data, "--work", str(work), *(["--layers", str(args.layers)] if args.layers else [])]
    return [sys.executable, __file__, *common, *extra]


def measure(args, work: Path) -> tuple[dict, list[dict]]:
    print("building the model and the data ...", flush=True)
    r = run_measured(child(args, work, "--internal", "build", "--max-length", *map(str, args.max_length)),
                     work / "build.log", cwd=work, env=OFFLINE)
    if r["rc"]:
        sys.exit(f"build failed (exit {r['rc']}):\n{tail(work / 'build.log')}")
    info = json.loads((work / "info.json").read_text())
    print(f"  {info['params'] / 1e6:,.1f}M parameters, {r['wall_s']:.0f}s", flush=True)
    runs = []
    for length in args.max_length:
        for round_ in range(1, args.rounds + 1):
            for arm in args.arms:
                log = work / f"{arm}-{length}-{round_}.log"
                print(f"max_length {length}, round {round_}: {arm} ...", flush=True)
                r = run_measured(child(args, work, "--internal", "arm", "--arm", arm, "--max-length", str(length)),
                                 log, cwd=work, env=OFFLINE)  # cwd: compile caches land in the temp folder
                if r["rc"]:
                    sys.exit(f"{arm} failed (exit {r['rc']}):\n{tail(log)}")
                result = json.loads((work / f"result-{arm}-{length}.json").read_text())
                runs.append({**result, "round": round_, "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss_gib"],
                             "load": os.getloadavg()[0]})  # other work on the machine shows here
                print(f"  {result['tokens_per_s']:,.0f} tok/s, {result['s_per_step']:.3f} s/step, "
                      f"process {r['wall_s']:.0f}s", flush=True)
    return info, runs


def peak_tflops(args, gpu: str | None) -> float | None:
    if args.peak_tflops or not gpu:
        return args.peak_tflops
    return next((peak for name, peak in PEAK_TFLOPS if name in gpu), None)


def tables(args, info, runs) -> str:
    on_gpu = "gpu" in runs[0]
    peak = peak_tflops(args, runs[0].get("gpu"))
    flops_per_token = 6 * info["matmul_params"]
    header = ["arm", "max_len", "round", "tok/s", "s/step", *(["alloc GiB", "reserved GiB"] if on_gpu else
              ["peak RSS GiB"]), *(["MFU"] if peak else []), "loss", "load s", "process s", "load avg"]
    rows = []
    for r in runs:
        memory = ([f"{r['peak_allocated_gib']:.2f}", f"{r['peak_reserved_gib']:.2f}"] if on_gpu
                  else [f"{r['peak_rss_gib']:.2f}"])
        mfu = [f"{r['tokens_per_s'] * flops_per_token / (peak * 1e12):.1%}"] if peak else []
        rows.append([r["arm"], r["max_length"], r["round"], f"{r['tokens_per_s']:,.0f}", f"{r['s_per_step']:.3f}",
                     *memory, *mfu, f"{r['train_loss']:.4f}", f"{r['load_s']:.1f}", f"{r['wall_s']:.0f}",
                     f"{r['load']:.2f}"])
    lines = [format_table(header, rows), ""]
    for length in args.max_length:  # the headline: medians per arm and their ratio
        med = {arm: statistics.median(r["tokens_per_s"] for r in runs if r["arm"] == arm and r["max_length"] == length)
               for arm in args.arms}
        ratio = (f", unsloth / baseline = {med['unsloth'] / med['baseline']:.2f}x"
                 if {"unsloth", "baseline"} <= med.keys() else "")
        ratio += "".join(f", {a} / unsloth = {v / med['unsloth']:.2f}x" for a, v in med.items()
                         if "+" in a and "unsloth" in med)  # a lever's gain over the app as it is
        lines.append(f"max_length {length}: median tok/s " + ", ".join(f"{a} {v:,.0f}" for a, v in med.items()) + ratio)
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.internal == "build":
        return build(args, Path(args.work))
    if args.internal == "arm":
        return run_arm(args, Path(args.work))
    if args.shape != "tiny" and gpu_name() == "none":
        sys.exit(f"--shape {args.shape} needs a CUDA GPU (4-bit training); on a CPU use --shape tiny")
    load_at_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-", dir="/tmp"))
    print(f"working in {work}")
    try:
        info, runs = measure(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    text = tables(args, info, runs)
    shape = (f"{args.shape}: Llama, hidden {info['hidden']}, {info['layers']} layers, MLP {info['intermediate']}, "
             f"{info['heads']} heads / {info['kv_heads']} KV heads, vocab {info['vocab']}, "
             f"{'tied' if info['tied'] else 'untied'} embeddings, {info['params'] / 1e6:,.1f}M parameters "
             f"({info['matmul_params'] / 1e6:,.1f}M in matmuls), random weights saved as {info['dtype']}")
    print(f"\n{shape}\n\n{text}")
    if args.no_record:
        return
    data = "recipes/data/tiny_prefs.jsonl" if args.data == "tiny" else "synthetic pairs filling max_length"
    notes = [
        f"model: {shape}; LoRA r {LORA_R}, alpha {LORA_R}, all seven projections, in both arms.",
        f"data: {data}; batch {args.batch} pairs, {args.steps} steps per run of which the first {args.warmup} are "
        f"left out; {args.rounds} rounds, arms alternating ({' '.join(args.arms)}), each run a fresh process.",
        "tok/s: non-padding tokens of chosen + rejected (prompt included) through the policy per second; "
        "s/step: the same interval over its steps; loss: TRL's mean training loss of the run (both arms start "
        "from the same weights and data, so they should agree closely); load s: loading the model and adding "
        "LoRA (Unsloth's import not included); process s: the whole process, imports included; load avg: the "
        "machine's 1-minute load average as the run ended (over the core count = other work competed).",
    ]
    if "gpu" in runs[0]:
        notes.append("alloc / reserved GiB: torch.cuda.max_memory_allocated / max_memory_reserved during training "
                     "(reset after loading, so the weights count and the loading transients do not).")
        notes.append("MFU: tok/s x 6N over the GPU's dense bf16 peak (" +
                     (f"{peak_tflops(args, runs[0]['gpu']):.0f} TFLOPS for {runs[0]['gpu']}" if peak_tflops(args, runs[0]["gpu"])
                      else f"unknown for {runs[0]['gpu']}: pass --peak-tflops") + "), N as in bench/dpo_speed.py's docstring.")
    else:
        notes.append("CPU only: peak RSS of each run's process (os.wait4), no MFU. These figures show that both "
                     "arms run and train alike; they say nothing about Unsloth's GPU kernels, which a CPU run does "
                     "not use (Unsloth's CPU backend is stock transformers + PEFT).")
        notes.append("CPU baseline: TRL 1.15's DPOTrainer computes per-token log-probs with a fused LM head whose "
                     "kernel is Triton, GPU-only (plain TRL on a CPU fails: 'RuntimeError: 0 active drivers'); "
                     "Unsloth's import replaces it, so the app trains on a CPU. The CPU baseline gets the same "
                     "outputs from full logits in plain torch (use_torch_logprobs); on a GPU it runs TRL's kernel.")
    append_section(f"dpo_speed (--shape {args.shape})", context(load_at_start), text, notes)


if __name__ == "__main__":
    main()
