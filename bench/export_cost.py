"""What exporting costs: merge, HF -> GGUF f16, q8_0 and q4_k_m, next to plainly copying the same bytes.

    .venv/bin/python bench/export_cost.py                          # ~1B Llama (hidden 2048, 16 layers), CPU
    .venv/bin/python bench/export_cost.py --hidden 256 --layers 2  # a quick check of the script itself

A random-initialised Llama shaped like Llama-3.2-1B (hidden 2048, 16 layers, MLP 8192, 32 heads, 8 KV heads)
but with the tiny model's SentencePiece tokenizer (~1k tokens instead of 128k: the converter needs a
tokenizer it knows, and the transformer blocks, not the vocabulary, are what a 1B export spends its time
on), saved as bf16 safetensors like a hub model, plus a random LoRA adapter (r 16, all seven
projections) saved by PEFT. Then, each step in its own process so its peak RSS is its own:
  copy     shutil.copyfile of the base's safetensors: the floor for any step that writes that many bytes
  merge    the app's path: app.model.load_trained_model (Unsloth, base + adapter) + app.export.merge_adapter
  f16      app.export.convert_to_gguf(..., ["f16"]): llama.cpp's convert_hf_to_gguf.py in a subprocess
  q8_0     app.llamacpp.quantize from the f16 file, as app.export.convert_to_gguf runs it
  q4_k_m   the same, to q4_k_m
All work happens in a temporary folder under /tmp, removed at the end (--keep keeps it).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GiB, ROOT, append_section, context, format_table, load_average, run_measured, tail  # noqa: E402

STEPS = ("build", "copy", "merge", "f16", "q8_0", "q4_k_m")
# everything is local: a lookup that slipped through to the hub would only add retry time to a step
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (k-quants need a multiple of 256)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate", type=int, help="MLP size (default 4 x hidden, as Llama-3.2-1B)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step in this process
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.intermediate = args.intermediate or 4 * args.hidden
    return args


# --- the steps, each run as `export_cost.py --step NAME --work DIR` in a process of its own ------------------

def step_build(args, work: Path) -> dict:
    """Random bf16 Llama + tokenizer in work/base, random LoRA adapter in work/adapter (as a run's adapter/)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from app.tiny import ensure_model

    tiny = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: no 4-bytes-per-parameter detour
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(work / "base"))
    tokenizer.save_pretrained(str(work / "base"))
    shutil.copy2(tiny / "tokenizer.model", work / "base")  # as a hub Llama-2-style model ships it

    # init_lora_weights=False: B is random too, so the merge really changes every projected weight. PEFT
    # writes the model's own name_or_path into adapter_config.json; it is how the loader finds the base.
    model.name_or_path = str(work / "base")
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0, target_modules=TARGETS,
                      bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(str(work / "adapter"))
    tokenizer.save_pretrained(str(work / "adapter"))
    return {"params": params, "vocab": len(tokenizer), "heads": heads, "kv_heads": max(1, heads // 4),
            "output_bytes": folder_bytes(work / "base") + folder_bytes(work / "adapter")}


def step_copy(args, work: Path) -> dict:
    """The baseline: the same bytes as the model's weights, read and written once on the same disk."""
    copied = 0
    for src in sorted((work / "base").glob("*.safetensors")):
        shutil.copyfile(src, work / f"copy-{src.name}")
        copied += src.stat().st_size
    return {"output_bytes": copied}


def step_merge(args, work: Path) -> dict:
    """The app's export path up to merged/: Unsloth loads base + adapter, save_pretrained_merged writes 16-bit."""
    t0 = time.perf_counter()
    from app.model import import_unsloth
    import_unsloth()  # before transformers/PEFT: it patches them on import
    from app.export import merge_adapter
    from app.model import load_trained_model
    from app.recipe import load_recipe

    t_import = time.perf_counter()
    # the tiny recipe with this model: bf16 (the model's own dtype), not 4-bit (Unsloth's CPU backend cannot
    # merge into a 4-bit base, FIELD-NOTES)
    recipe = load_recipe("tiny", [f"model.name={work / 'base'}", "model.dtype=bfloat16", "model.load_in_4bit=false",
                                  "model.max_seq_length=2048"])
    model, tokenizer = load_trained_model(recipe, work / "adapter")
    t_load = time.perf_counter()
    merge_adapter(model, tokenizer, work / "merged", str(work / "base"))
    t_merge = time.perf_counter()
    return {"import_s": t_import - t0, "load_s": t_load - t_import, "merge_save_s": t_merge - t_load,
            "dtype": str(next(model.parameters()).dtype), "output_bytes": folder_bytes(work / "merged")}


def step_f16(args, work: Path) -> dict:
    from app.export import convert_to_gguf
    made = convert_to_gguf(work / "merged", work / "gguf", "bench", ["f16"], log=print)
    return {"output_bytes": made["f16"].stat().st_size}


def step_quantize(args, work: Path, gguf_type: str) -> dict:
    """The quantize call of app.export.convert_to_gguf, alone (that function would run the converter again)."""
    from app.gguf import QUANTIZED
    from app.llamacpp import quantize

    src, out = work / "gguf" / "bench-f16.gguf", work / "gguf" / f"bench-{gguf_type}.gguf"
    if quantize(src, out, QUANTIZED[gguf_type]) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src.name} to {gguf_type}")
    return {"output_bytes": out.stat().st_size}


def run_step(args):
    """Child side: run one step, write its figures to work/<step>.json."""
    work = Path(args.work)
    t0 = time.perf_counter()
    if args.step in ("q8_0", "q4_k_m"):
        result = step_quantize(args, work, args.step)
    else:
        result = {"build": step_build, "copy": step_copy, "merge": step_merge, "f16": step_f16}[args.step](args, work)
    result["work_s"] = time.perf_counter() - t0
    (work / f"{args.step}.json").write_text(json.dumps(result))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- the parent: run the steps, print the table, record it -------------------------------------------------

def measure(args, work: Path) -> dict:
    """{step: figures}: the step's own report plus wall time and peak RSS taken from outside."""
    shape = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--intermediate", str(args.intermediate),
             "--lora-r", str(args.lora_r)]
    figures = {}
    for step in STEPS:
        print(f"{step} ...", flush=True)
        # cwd is the temp folder: anything a library writes next to itself (compile caches) goes away with it
        r = run_measured([sys.executable, __file__, "--step", step, "--work", str(work), *shape],
                         work / f"{step}.log", cwd=work, env=OFFLINE)
        if r["rc"] != 0:
            sys.exit(f"step {step} failed (exit {r['rc']}); its log ends:\n{tail(work / f'{step}.log')}")
        figures[step] = {**json.loads((work / f"{step}.json").read_text()), **r}
        print(f"  {r['wall_s']:.1f}s, peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    return figures


def table(figures) -> str:
    copy_s = figures["copy"]["wall_s"]
    rows = []
    for step in STEPS:
        f = figures[step]
        ratio = "-" if step == "build" else f"{f['wall_s'] / copy_s:.1f}x"
        rows.append([step, f"{f['wall_s']:.1f}", f"{f['work_s']:.1f}", ratio, f"{f['peak_rss_gib']:.2f}",
                     f"{f['output_bytes'] / 2**20:,.1f}"])
    return format_table(["step", "wall s", "in-step s", "vs copy", "peak RSS GiB", "output MiB"], rows)


def main():
    args = parse_args()
    if args.step:
        return run_step(args)
    load_at_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench-export-", dir="/tmp"))
    print(f"working in {work}")
    t0 = time.perf_counter()
    try:
        figures = measure(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    b, m = figures["build"], figures["merge"]
    shape = (f"Llama, hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, {b['heads']} heads / "
             f"{b['kv_heads']} KV heads, vocab {b['vocab']} (the tiny SentencePiece tokenizer), untied embeddings: "
             f"{b['params'] / 1e9:.3f}B parameters, bf16 safetensors; LoRA r {args.lora_r} on all seven projections")
    text = table(figures)
    print(f"\n{shape}\n\n{text}\n\ntotal {time.perf_counter() - t0:.0f}s")
    if args.no_record:
        return
    notes = [
        f"model: {shape}.",
        "wall s: the step's whole process (interpreter, imports, work) from outside; in-step s: timed "
        "inside the process, after the interpreter started (merge's includes importing Unsloth); vs copy: wall s over the copy's wall s (copy = shutil.copyfile of the base's "
        f"safetensors, {figures['copy']['output_bytes'] / GiB:.2f} GiB, same disk, same run).",
        f"merge = Unsloth import {m['import_s']:.1f}s + load base and adapter {m['load_s']:.1f}s (loaded as "
        f"{m['dtype']}) + merge and save {m['merge_save_s']:.1f}s (app.model.load_trained_model + "
        "app.export.merge_adapter; the merged-vs-trained check of export_run is not included).",
        "peak RSS: the largest process of the step (os.wait4 on the step's process, which covers the children "
        "it waited for: for f16 that is llama.cpp's converter, a subprocess). GiB = 2^30 bytes, MiB = 2^20.",
        "q8_0 and q4_k_m are made from the f16 GGUF with llama.cpp's quantizer (nthread 0: all cores).",
        "Every file was just written, so reads come from the page cache (the machine's RAM holds them all); "
        "no step fsyncs, the copy included.",
    ]
    append_section(f"export_cost (hidden {args.hidden}, {args.layers} layers)", context(load_at_start), text, notes)


if __name__ == "__main__":
    main()
