"""The export stage: LoRA adapter -> merged 16-bit weights -> GGUF files, all without network.

The merge is made from the trained model itself, one tensor at a time: each LoRA layer's base weight is
dequantized as training saw it (bitsandbytes through PEFT's `dequantize_module_weight`; a 16-bit base as
it is), PEFT's `get_delta_weight` of the adapter in float32 is added in float32, and the sum is rounded
once to the base's own 16-bit dtype and written shard by shard. Unsloth's `save_pretrained_merged` is not used: on a 4-bit model
it downloads the original 16-bit weights and merges onto those, which is not the model that was trained
(and needs the network), and its CPU backend refuses 4-bit bases. Host memory stays at about one shard.
The merged file is then checked, weight by weight, against an exact float32 merge. Conversion is
llama.cpp's own convert_hf_to_gguf.py of the runtime's release (see llamacpp.py); quantization is
llama.cpp's, through llama-cpp-python's `llama_model_quantize`.
"""
import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

from app import AppError
from app.gguf import CHAT_PREFERENCE, CONVERTED, QUANTIZED
from app.llamacpp import prepare_tokenizer_for_converter, run_converter, run_quantizer
from app.ollama import modelfile_template, write_modelfile
from app.runs import discard_manifest, disk_full, write_manifest

logger = logging.getLogger(__name__)

# export.base: the untrained base as GGUF, for `compare`. Outside gguf/, which holds the run's own model:
# smoke, chat, serve and the report read every file there as the aligned model.
BASE_GGUF = Path("base-gguf") / "base-f16.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
SHARD_BYTES = 2**28  # merged safetensors shards of 256 MiB: what the merge holds in host memory at once
ROWS_BYTES = 2**24   # the check compares a tensor 16 MiB (of float32) at a time
# a merged weight may differ from the exact float32 merge by at most this many units in the last place of
# its 16-bit dtype (see weight_error): rounding once gives at most 0.5; a lost or mis-scaled adapter its own size
MERGE_ULPS = 1.0


def export_run(run: Path, recipe, model, tokenizer, base_source: str, log=print) -> dict:
    """The stage: merged/ and gguf/ in the run folder, then the manifest. Returns the merge check."""
    discard_manifest(run)  # files are rewritten from here on: the run is incomplete until the manifest is back
    return_large_blocks_on_free()
    dtype = merged_dtype(base_source)
    check_room_for_export(run, model, recipe.export.gguf)
    log(f"export: saving the trained weights in {str(dtype).removeprefix('torch.')} (full fine-tuning: no merge)"
        if plain_model(model) is model else
        f"export: merging the adapter into {str(dtype).removeprefix('torch.')} weights (the base as trained, "
        f"dequantized if it was 4-bit)")
    merge_adapter(model, tokenizer, run / "merged", base_source, dtype)
    merge = check_merged_weights(model, run / "merged")
    log(f"  {merge['summary']}")
    log(f"export: GGUF {', '.join(recipe.export.gguf)} with llama.cpp's converter")
    made = convert_to_gguf(run / "merged", run / "gguf", recipe.name, recipe.export.gguf, log)
    if recipe.export.base:
        log("export: the base model as GGUF f16 (export.base), for `python -m app compare`")
        convert_base_model(base_source, run / "merged", run / BASE_GGUF.parent, log)
    chosen = next(made[t] for t in (*CHAT_PREFERENCE, *made) if t in made)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_ids(model, tokenizer)]
    modelfile = write_modelfile(chosen, tokenizer.chat_template, stops, recipe.export.system)
    translated = modelfile_template(tokenizer.chat_template) is not None
    log(f"  {modelfile.name} for Ollama: FROM {chosen.name}" + ("" if translated else
        ", no TEMPLATE (this chat template's family is not translated; Ollama will use its default)"))
    write_manifest(run)
    return merge


def return_large_blocks_on_free():
    """From here on, glibc serves every block over 128 KiB with its own mmap, given back when freed.

    glibc starts that way but raises the threshold (up to 32 MiB) each time such a block is freed; then the
    merge's per-tensor float32 temporaries come from the heap, between the shard's kept 16-bit tensors,
    and are not given back. Measured on the scale model in bf16: +1.12 GiB of heap to build one 257 MiB
    shard, against +0.26 GiB with the threshold fixed. Not set for training, which it slows by 20% on a
    CPU. Elsewhere than glibc (macOS, musl) there is nothing to set."""
    import ctypes

    M_MMAP_THRESHOLD = -3  # glibc's malloc.h
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)  # what training freed goes back now, not at the next shard
        logger.debug("glibc's mmap threshold fixed at 128 KiB for the export")
    except (OSError, AttributeError):
        logger.debug("not glibc: the mmap threshold is left as it is")


def check_room_for_export(run: Path, model, types):
    """Said before the merge starts: the disk must hold the merged 16-bit weights and every GGUF (with the
    converter's f16 when only quantized types are asked for), and host memory one merged shard."""
    import psutil

    from app.gguf import GGUF_BITS
    params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)  # packed: two 4-bit values a byte
                 for n, p in plain_model(model).named_parameters() if ".lora_" not in n)
    ggufs = sum(GGUF_BITS[t] for t in {*types, "f16"}) / 8 * params
    need, free = 2 * params + ggufs, shutil.disk_usage(run).free
    if need > free:
        raise AppError(f"the export needs about {need / 2**30:.1f} GiB of disk (merged 16-bit weights and GGUF "
                       f"{', '.join(types)}) but {free / 2**30:.1f} GiB is free where {run.name} is; free some "
                       f"space, then run `python -m app export {run.name}`")
    shard, available = min(SHARD_BYTES, 2 * params), psutil.virtual_memory().available
    if shard > available:
        raise AppError(f"the merge holds up to {shard / 2**30:.1f} GiB of weights in memory at a time but only "
                       f"{available / 2**30:.1f} GiB is available; close other programs and run "
                       f"`python -m app export {run.name}`")


def merged_dtype(base_source: str):
    """The base's own 16-bit dtype, from its config.json (a bitsandbytes checkpoint keeps the original's);
    bfloat16 for a float32 base, or when the config does not say."""
    import torch

    from app.model import local_model_folder
    folder = local_model_folder(base_source)
    config = json.loads((folder / "config.json").read_text()) if folder else {}
    return torch.float16 if (config.get("dtype") or config.get("torch_dtype")) == "float16" else torch.bfloat16


@contextlib.contextmanager
def float32_adapters(model):
    """The LoRA weights in float32, and float32 matrix products at full precision (no TF32), for the merge
    and its check; back as they were afterwards (a 16-bit value is a float32 value: both casts are exact).

    PEFT's `get_delta_weight` multiplies B @ A in the adapter's own dtype, and TRL trains a 4-bit model's
    adapter in bfloat16 (QLoRA's recipe). A bfloat16 matrix product is not rounded once: its partial sums
    are, and where they cancel the delta misses by several of its own ulps (measured: 8 ulp on SmolLM2's
    layers.27.mlp.up_proj, inside the training process only; a new process loads the adapter in float32).
    In float32 the delta is exact to far below the merged weight's 16-bit rounding, which is then the only
    rounding left."""
    import torch
    from peft.tuners.lora import LoraLayer

    adapters = [m for layer in plain_model(model).modules() if isinstance(layer, LoraLayer)
                for part in (layer.lora_A, layer.lora_B) for m in part.values()]
    dtypes, precision = [m.weight.dtype for m in adapters], torch.get_float32_matmul_precision()
    for m in adapters:
        m.float()
    torch.set_float32_matmul_precision("highest")
    try:
        yield model
    finally:
        torch.set_float32_matmul_precision(precision)
        for m, dtype in zip(adapters, dtypes):
            m.to(dtype)


def plain_model(model):
    """The transformers model inside a PEFT model; a fully fine-tuned model is one already."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trained_tensors(model, exact: bool = False):
    """(name, base, delta) for every weight of the trained model as one plain model, in checkpoint names;
    the trained weight is base + delta (delta None where there is no adapter, and base then as it is held,
    so that an embedding matrix is not copied to float32; float32 where there is a delta).

    A LoRA layer's base is its weight as the forward pass sees it (a 4-bit one dequantized); its delta is
    PEFT's own `get_delta_weight`, or with `exact` lora_B @ lora_A * scaling computed here, independently,
    for the check. Tied weights appear once."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    inner = plain_model(model)
    layers = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    for pname, param in inner.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        if ".lora_" in pname or ".modules_to_save." in pname:
            continue
        name = owner.removesuffix(".base_layer")
        if name in layers and leaf == "weight":
            layer = layers[name]
            delta = 0.0
            for adapter in layer.active_adapters:
                if exact:
                    a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
                    delta = delta + (b @ a) * layer.scaling[adapter]
                else:
                    delta = delta + layer.get_delta_weight(adapter).float()
            yield f"{name}.weight", dequantize_module_weight(layer.get_base_layer()).float(), delta
        elif type(param).__name__ == "Params4bit":  # a quantized layer without LoRA
            yield f"{name}.{leaf}", dequantize_module_weight(inner.get_submodule(owner)).float(), None
        else:
            yield f"{name}.{leaf}", param.detach(), None


def merge_adapter(model, tokenizer, out: Path, base_source: str, dtype):
    """merged/: safetensors shards of the trained weights rounded once to `dtype`, with config (its
    quantization removed), generation config and tokenizer. Written under a temporary name."""
    import copy

    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards, shard, size = [], {}, 0
        with float32_adapters(model):
            for name, base, delta in trained_tensors(model):
                shard[name] = (base if delta is None else base.float() + delta).to(dtype).cpu().contiguous()
                size += shard[name].nbytes
                if size >= SHARD_BYTES:
                    shards.append(_write_shard(tmp, len(shards), shard, save_file))
                    shard, size = {}, 0
        if shard or not shards:
            shards.append(_write_shard(tmp, len(shards), shard, save_file))
        _name_shards(tmp, shards)
        config = copy.deepcopy(plain_model(model).config)
        for key in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, key):
                delattr(config, key)
        config.dtype = dtype
        config.save_pretrained(str(tmp))
        plain_model(model).generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except Exception as e:  # safetensors words a full disk as its own error type, not OSError
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise AppError(f"could not write the merged model into {out.parent.name}: {disk_full(e)}; free some "
                           f"disk space and run `python -m app export {out.parent.name}` again") from None
        raise
    prepare_tokenizer_for_converter(tmp, base_source)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _write_shard(folder: Path, index: int, tensors: dict, save_file) -> tuple[Path, list]:
    path, t0 = folder / f"shard-{index}.safetensors", time.time()
    save_file(tensors, str(path), metadata={"format": "pt"})
    logger.info(f"merged shard {index}: {len(tensors)} tensors, {path.stat().st_size / 2**20:.0f} MiB, "
                f"{time.time() - t0:.1f}s to write")
    return path, list(tensors)


def _name_shards(folder: Path, shards):
    """Transformers' names: model.safetensors, or model-0000i-of-0000n.safetensors with an index."""
    if len(shards) == 1:
        shards[0][0].rename(folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (path, names) in enumerate(shards, 1):
        final = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += path.stat().st_size
        path.rename(final)
        weight_map.update({n: final.name for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


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


def check_merged_weights(model, merged: Path) -> dict:
    """Every tensor of merged/ against the exact float32 merge of the trained model (trained_tensors with
    exact=True), one tensor at a time, so it costs no second copy of the model. AppError when the verdict
    fails; else the measures and a one-line summary."""
    from safetensors import safe_open

    files = sorted(merged.glob("*.safetensors"))
    where = {name: f for f in files for name in safe_open(str(f), "pt").keys()}
    stats, seen = [], set()
    with float32_adapters(model):
        for name, base, delta in trained_tensors(model, exact=True):
            if name not in where:
                stats.append({"name": name, "missing": True})
                continue
            with safe_open(str(where[name]), "pt") as f:
                stats.append(weight_error(name, f.get_slice(name), base, delta))
            seen.add(name)
    stats += [{"name": n, "unexpected": True} for n in where if n not in seen]
    for s in sorted((s for s in stats if "max_ulps" in s), key=lambda s: -s["max_ulps"])[:5]:
        logger.info(f"merge check: {s['name']}: {s['max_ulps']:.3f} ulp, {s['changed']:,} of {s['numel']:,} changed")
    verdict = merge_verdict(stats)
    if not verdict["passed"]:
        raise AppError(f"the merged weights are not the trained model: {verdict['reason']}; the export stops here")
    return verdict


def weight_error(name: str, saved, base, delta) -> dict:
    """How far a saved 16-bit tensor is from the exact float32 merge base + delta, in units of its dtype's
    spacing (ulp) at the merged value: the merge rounds once, so at most 0.5 (float32_adapters). Also how
    many of the tensor's 16-bit values the adapter changed at all. `saved` is a tensor or a safetensors
    slice, read ROWS_BYTES at a time, so a 128k-token embedding is never held twice."""
    import torch

    def spacing(x, dtype):  # of the 16-bit numbers at |x|
        finfo = torch.finfo(dtype)
        x = x.to(dtype).float().abs()
        return torch.clamp(torch.exp2(torch.floor(torch.log2(x))) * finfo.eps, min=float(finfo.tiny) * finfo.eps)

    shape = tuple(saved.shape) if hasattr(saved, "shape") else tuple(saved.get_shape())
    if shape != tuple(base.shape) or not shape:
        return {"name": name, "max_ulps": float("inf"), "numel": base.numel(), "changed": 0, "shape_ok": False}
    error, changed = 0.0, 0
    step = max(1, ROWS_BYTES // (4 * max(1, base.numel() // shape[0])))
    for start in range(0, shape[0], step):
        rows = slice(start, start + step)
        got = saved[rows].to(base.device)
        exact = base[rows].float() if delta is None else base[rows].float() + delta[rows]
        error = max(error, ((got.float() - exact).abs() / spacing(exact, got.dtype)).max().item())
        if delta is not None:
            changed += int((exact.to(got.dtype) != base[rows].to(got.dtype)).sum())
    return {"name": name, "max_ulps": error, "numel": base.numel(), "changed": changed, "shape_ok": True,
            "merged": delta is not None}


def merge_verdict(stats: list[dict], max_ulps: float = MERGE_ULPS) -> dict:
    """Pure: the merged weights pass when every tensor of the trained model is there, with its shape, and
    within `max_ulps` of the exact merge. Rounding once to 16 bits gives at most 0.5 ulp however few the
    steps; a lost or mis-scaled adapter misses by its own size wherever that exceeds rounding. (An adapter
    below rounding everywhere leaves the 16-bit weights as the base's: `changed` is then 0, said, not failed.)"""
    problems = [f"{s['name']} is missing" for s in stats if s.get("missing")]
    problems += [f"{s['name']} is not in the trained model" for s in stats if s.get("unexpected")]
    measured = [s for s in stats if "max_ulps" in s]
    problems += [f"{s['name']} has the wrong shape" for s in measured if not s["shape_ok"]]
    worst = max(measured, key=lambda s: s["max_ulps"], default={"name": "-", "max_ulps": 0.0})
    bad = [s for s in measured if s["max_ulps"] > max_ulps]
    if bad and worst["shape_ok"]:
        problems.append(f"{len(bad)} of {len(measured)} tensors differ from the exact merge by more than "
                        f"rounding (worst {worst['name']}: {worst['max_ulps']:.1f} ulp > {max_ulps})")
    changed = sum(s.get("changed", 0) for s in measured)
    share = changed / max(1, sum(s["numel"] for s in measured))
    summary = (f"merged weights are the exact merge rounded once: {len(measured)} tensors within "
               f"{worst['max_ulps']:.2f} ulp; the adapter changed {share:.2%} of the 16-bit weights"
               + (" (it is below 16-bit rounding: the merged model is the base)" if not changed else ""))
    if not any(s.get("merged") for s in measured):  # full fine-tuning: no adapter, the weights themselves trained
        summary = (f"saved weights are the trained weights rounded once: {len(measured)} tensors within "
                   f"{worst['max_ulps']:.2f} ulp (full fine-tuning: nothing to merge)")
    return {"passed": not problems, "reason": "; ".join(problems[:3]), "tensors": len(measured),
            "max_ulps": round(worst["max_ulps"], 3), "worst": worst["name"], "changed_share": round(share, 6),
            "summary": summary}


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS and the generation config's (e.g. <|eot_id|>)."""
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return list(dict.fromkeys([tokenizer.eos_token_id, *ids]))


def convert_to_gguf(merged: Path, out_dir: Path, stem: str, types, log=print) -> dict:
    """{type: path} for every requested GGUF type; each file appears only when complete. The converter and
    the quantizer run in child processes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.gguf.tmp"):  # left by an export that was killed
        stale.unlink()
    made, seconds = {}, {}
    # the converter writes f16 (and f32/bf16 when asked); quantized types start from the best of those
    base_type = "f32" if "f32" in types else "f16"
    for t in [t for t in CONVERTED if t in types or t == base_type]:
        t0 = time.time()
        final, tmp = out_dir / f"{stem}-{t}.gguf", out_dir / f".{stem}-{t}.gguf.tmp"
        converter_log = run_converter(merged, tmp, t)
        logger.debug(f"converter, {t}:\n{converter_log}")
        tmp.rename(final)
        made[t], seconds[t] = final, time.time() - t0
    for t in [t for t in types if t in QUANTIZED]:
        t0 = time.time()
        final, tmp = out_dir / f"{stem}-{t}.gguf", out_dir / f".{stem}-{t}.gguf.tmp"
        if not run_quantizer(made[base_type], tmp, QUANTIZED[t]):
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
