"""The export stage: LoRA adapter -> merged 16-bit weights -> GGUF files, all without network.

Merging is Unsloth's (`save_pretrained_merged`); conversion is llama.cpp's own convert_hf_to_gguf.py of
the runtime's release (see llamacpp.py); quantization is llama.cpp's, through llama-cpp-python's
`llama_model_quantize`. The merged model is checked against the trained one before any GGUF is made.
"""
import json
import shutil
import time
from pathlib import Path

from app import AppError
from app.llamacpp import run_converter
from app.ollama import modelfile_template, write_modelfile
from app.runs import discard_manifest, disk_full, write_manifest

CONVERTED = ("f32", "f16", "bf16")  # written by the converter itself
QUANTIZED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
             "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
             "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}  # made from the f16 (or f32) file
GGUF_TYPES = (*CONVERTED, *QUANTIZED)
# bits per weight of each type, llama.cpp's figures rounded up (k-quants mix types across tensors): disk estimates
GGUF_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_0": 4.6}
CHAT_PREFERENCE = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16", "bf16", "f32", "q4_0")  # for chat and Ollama
# export.base: the untrained base as GGUF, for `compare`. Outside gguf/, which holds the run's own model:
# smoke, chat, serve and the report read every file there as the aligned model.
BASE_GGUF = Path("base-gguf") / "base-f16.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
MERGE_TOLERANCE = 0.25  # merged-vs-trained logit error, as a share of the adapter's effect on the logits
ROUNDING_FLOOR = 0.01   # ... or as a share of the largest logit: 16-bit rounding alone (bf16 keeps ~0.4%)


def export_run(run: Path, recipe, model, tokenizer, base_source: str, log=print) -> dict:
    """The stage: merged/ and gguf/ in the run folder, then the manifest. Returns the merge check."""
    discard_manifest(run)  # files are rewritten from here on: the run is incomplete until the manifest is back
    log("export: merging the adapter into 16-bit weights")
    merge_adapter(model, tokenizer, run / "merged", base_source)
    merge = check_merged_matches(model, tokenizer, run / "merged", recipe.export["probes"])
    log(f"  merged model matches the trained one: max logit difference {merge['max_logit_error']:.4f}, "
        f"{merge['ratio']:.1%} of the adapter's effect ({merge['adapter_effect']:.3f})")
    log(f"export: GGUF {', '.join(recipe.export['gguf'])} with llama.cpp's converter")
    made = convert_to_gguf(run / "merged", run / "gguf", recipe.name, recipe.export["gguf"], log)
    if recipe.export.get("base"):
        log("export: the base model as GGUF f16 (export.base), for `python -m app compare`")
        convert_base_model(base_source, run / "merged", run / BASE_GGUF.parent, log)
    chosen = next(made[t] for t in (*CHAT_PREFERENCE, *made) if t in made)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_ids(model, tokenizer)]
    modelfile = write_modelfile(chosen, tokenizer.chat_template, stops, recipe.export["system"])
    translated = modelfile_template(tokenizer.chat_template) is not None
    log(f"  {modelfile.name} for Ollama: FROM {chosen.name}" + ("" if translated else
        ", no TEMPLATE (this chat template's family is not translated; Ollama will use its default)"))
    write_manifest(run)
    return merge


def merge_adapter(model, tokenizer, out: Path, base_source: str):
    """Merged 16-bit safetensors with tokenizer and chat template, via Unsloth."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained_merged(str(tmp), tokenizer, save_method="merged_16bit")
    except Exception as e:  # safetensors words a full disk as its own error type, not OSError
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise AppError(f"could not write the merged model into {out.parent.name}: {disk_full(e)}; free some "
                           f"disk space and run `python -m app export {out.parent.name}` again") from None
        raise
    prepare_tokenizer_for_converter(tmp, base_source)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def prepare_tokenizer_for_converter(model_dir: Path, base_source: str):
    """Two gaps between what transformers 5 saves and what llama.cpp's converter reads:
    - tokenizer.model: Unsloth's merged folder lacks the base's SentencePiece file, and the converter then
      guesses the vocabulary from tokenizer.json instead: copy it over when the base has one;
    - added_tokens_decoder: the converter learns which added tokens are special (chat markers) only from
      tokenizer_config.json, where transformers 5 no longer writes them; without it `<|user|>` becomes
      plain text in the GGUF and llama.cpp tokenizes the chat template differently. Restore it from
      tokenizer.json."""
    src = Path(base_source) / "tokenizer.model"
    if not src.is_file() and not Path(base_source).is_dir():
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(base_source, "tokenizer.model")
        src = Path(cached) if isinstance(cached, str) else src
    if src.is_file() and not (model_dir / "tokenizer.model").exists():
        shutil.copy2(src, model_dir / "tokenizer.model")

    config_path, tokenizer_json = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if config_path.is_file() and tokenizer_json.is_file():
        config = json.loads(config_path.read_text())
        if "added_tokens_decoder" not in config:
            added = json.loads(tokenizer_json.read_text()).get("added_tokens", [])
            config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def convert_base_model(base_source: str, merged: Path, out_dir: Path, log=print) -> Path | None:
    """out_dir/base-f16.gguf from the base's weights with the merged folder's tokenizer files: the recipe's
    chat template and the special tokens the converter needs (see prepare_tokenizer_for_converter), so the
    base and the aligned GGUF turn a prompt into the same tokens and a comparison shows only the training.
    None, with a note, when the base is stored quantized (bitsandbytes), which the converter cannot read."""
    import tempfile

    if not (merged / "tokenizer_config.json").is_file():  # the base's own may lack the special-token fix
        raise AppError(f"{merged} has no tokenizer_config.json; the base GGUF takes its tokenizer from there")
    from app.model import local_model_folder
    folder = local_model_folder(base_source)  # training loaded it from there
    if folder is None:
        raise AppError(f"the base model {base_source} is not in the local Hugging Face cache any more")
    quantization = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if quantization:
        log(f"  skipped: {base_source} is stored quantized ({quantization.get('quant_method', '?')}), which "
            f"llama.cpp's converter cannot read; `compare` runs the base through transformers instead")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp)
        for path in folder.iterdir():  # links, not copies: the weights can be many GB
            if path.is_file() and path.name not in TOKENIZER_FILES:
                (source / path.name).symlink_to(path.resolve())
        for name in TOKENIZER_FILES:  # exactly the tokenizer the aligned GGUF was converted with
            if (merged / name).is_file():
                shutil.copy2(merged / name, source / name)
        made = convert_to_gguf(source, out_dir, "base", ["f16"], log)  # BASE_GGUF's name
    return made["f16"]


def check_merged_matches(model, tokenizer, merged: Path, prompts) -> dict:
    """Compare the merged weights on disk with the trained model (base + LoRA) on the probe prompts.

    The merged model is 16-bit, so it never equals the trained one exactly; what matters is that the
    difference is small next to what the adapter changed. A merge that lost or mis-scaled the LoRA
    differs by about the adapter's whole effect (ratio ~1); rounding to 16 bits gives a ratio near 0.
    After very few steps the adapter's effect is itself rounding-sized, so an error within ROUNDING_FLOOR
    of the logits' scale passes too (a lost adapter that changed almost nothing costs almost nothing)."""
    import torch

    merged_model = load_reference_model(merged)
    error = effect = scale = 0.0
    model.eval()
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
        with torch.no_grad():
            trained = model(input_ids=ids).logits.float()
            with model.disable_adapter():
                base = model(input_ids=ids).logits.float()
            merged_logits = merged_model(input_ids=ids.to(merged_model.device)).logits.float().to(trained.device)
            error = max(error, (trained - merged_logits).abs().max().item())
            effect = max(effect, (trained - base).abs().max().item())
            scale = max(scale, trained.abs().max().item())
    del merged_model
    ratio = error / max(effect, 1e-6)
    if ratio > MERGE_TOLERANCE and error > ROUNDING_FLOOR * scale:
        raise AppError(f"the merged model differs from the trained one: max logit difference {error:.4f} is "
                       f"{ratio:.0%} of the adapter's own effect ({effect:.4f}), over {MERGE_TOLERANCE:.0%}; "
                       f"the export stops here")
    return {"max_logit_error": error, "adapter_effect": effect, "ratio": ratio}


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS and the generation config's (e.g. <|eot_id|>)."""
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return list(dict.fromkeys([tokenizer.eos_token_id, *ids]))


def load_reference_model(model_dir: Path):
    """A saved model in float32 for exact comparisons. device_map="auto" puts what fits on the GPU and the
    rest in CPU memory, so an 8B check after training does not run out of GPU memory (it is slower)."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, device_map="auto").eval()


def convert_to_gguf(merged: Path, out_dir: Path, stem: str, types, log=print) -> dict:
    """{type: path} for every requested GGUF type; each file appears only when complete."""
    import logging

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # the quantizer logs every tensor
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.gguf.tmp"):  # left by an export that was killed
        stale.unlink()
    made, seconds = {}, {}
    # the converter writes f16 (and f32/bf16 when asked); quantized types start from the best of those
    base_type = "f32" if "f32" in types else "f16"
    for t in [t for t in CONVERTED if t in types or t == base_type]:
        t0 = time.time()
        final, tmp = out_dir / f"{stem}-{t}.gguf", out_dir / f".{stem}-{t}.gguf.tmp"
        run_converter(merged, tmp, t)
        tmp.rename(final)
        made[t], seconds[t] = final, time.time() - t0
    for t in [t for t in types if t in QUANTIZED]:
        t0 = time.time()
        final, tmp = out_dir / f"{stem}-{t}.gguf", out_dir / f".{stem}-{t}.gguf.tmp"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, QUANTIZED[t])
        params.nthread = 0
        if llama_cpp.llama_model_quantize(str(made[base_type]).encode(), str(tmp).encode(), params) != 0:
            tmp.unlink(missing_ok=True)
            full = shutil.disk_usage(out_dir).free < made[base_type].stat().st_size
            raise AppError(f"llama.cpp could not quantize {made[base_type].name} to {t}"
                           + (": the disk is (nearly) full; free some space and export again" if full else ""))
        tmp.rename(final)
        made[t], seconds[t] = final, time.time() - t0
    for t in list(made):
        if t not in types:  # an intermediate the user did not ask for
            made.pop(t).unlink()
    for t, path in made.items():
        log(f"  {path.name:<28} {path.stat().st_size / 2**20:8.1f} MiB  {seconds[t]:5.1f}s")
    return made
