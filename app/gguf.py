"""Everything about GGUF files in one place: the types the app writes and what each must reach in the smoke
test, a file's type, finding a run's GGUF, the header check, and opening one in llama.cpp.

Files are named <recipe>-<type>.gguf (export.py); gguf_type reads the type back from the name.
"""
import json
import logging
from pathlib import Path

from app import AppError
from app.runs import resolve_run

logger = logging.getLogger(__name__)

CONVERTED = ("f32", "f16", "bf16")  # written by the converter itself
QUANTIZED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
             "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
             "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}  # made from the f16 (or f32) file
GGUF_TYPES = (*CONVERTED, *QUANTIZED)
# bits per weight of each type, llama.cpp's figures rounded up (k-quants mix types across tensors): disk estimates
GGUF_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_0": 4.6}
CHAT_PREFERENCE = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16", "bf16", "f32", "q4_0")  # for chat and Ollama

# What each type must reach in the smoke test (app/smoke.py), against a reference computed in float32 from
# the merged 16-bit weights: (the logit error judged, its largest share of the reference's largest logit, the
# least raw top-1 agreement). Shares, not absolute values: the logits' range is the model's.
# - The converter's own types are exact up to rounding: their largest error, and top-1 wherever the reference
#   is decisive (smoke.py). Measured on SmolLM2-135M: f32 0.0016, f16 0.0018-0.0020, bf16 0.008-0.016.
# - Quantized types add llama.cpp's rounding of weights and of activations; one outlier position says little
#   (a torch simulation of q8_0's rounding misses SmolLM2 by as much as llama.cpp's q8_0 does), so their mean
#   error and their raw top-1 are judged. The limits are about 2x what correct files measured on SmolLM2-135M,
#   the noisiest model here (small, with outlier activations; two runs, mean share / top-1): q8_0 0.008-0.010 /
#   97-98%, q6_k 0.010-0.011 / 91-97%, q5_k_m 0.038-0.043 / 82-84%, q4_k_m 0.025-0.033 / 83-91%, q4_0
#   0.078-0.085 / 55-68%; tiny's are 10x smaller (bench/smoke_gates.py). At 8 and 6 bits they fail a file with
#   two layers swapped (0.055-0.067 / 74-76%) or one layer's weights 30% off (0.024 / 80-92%). At 5 and 4 bits on
#   a 135M model those stay within the type's own noise (q4_k_m 0.034-0.065 / 72-82%): there the gates catch a
#   file broken outright, and exactness rests on the f16 file every quantized one is made from, whose exact
#   check fails both by 13x and more.
THRESHOLDS = {
    "f32": ("max", 0.02, 1.0), "f16": ("max", 0.02, 1.0), "bf16": ("max", 0.04, 1.0),
    "q8_0": ("mean", 0.02, 0.9), "q6_k": ("mean", 0.025, 0.85), "q5_k_m": ("mean", 0.08, 0.65),
    "q4_k_m": ("mean", 0.08, 0.65), "q4_0": ("mean", 0.17, 0.45),
}
EXACT = CONVERTED  # the converter's own types: no quantization, so agreement up to rounding


def gguf_type(path: Path) -> str:
    return path.stem.rsplit("-", 1)[-1]


def find_gguf(arg: str | None, quant: str | None = None) -> Path:
    """A .gguf path as given, or the GGUF of a run folder: `quant` if named, else the smallest good one."""
    if arg and arg.endswith(".gguf"):
        if not Path(arg).is_file():
            raise AppError(f"GGUF file {arg} does not exist")
        return Path(arg)
    run = resolve_run(arg)
    files = {gguf_type(p): p for p in (run / "gguf").glob("*.gguf")}
    if not files:
        raise AppError(f"{run.name} has no GGUF files; run `python -m app export {run.name}`")
    if quant:
        if quant not in files:
            raise AppError(f"{run.name} has no {quant} GGUF; it has {', '.join(sorted(files))}")
        return files[quant]
    return next(files[t] for t in (*CHAT_PREFERENCE, *files) if t in files)


def check_gguf_file(path: Path):
    """AppError unless the file starts like a GGUF (magic, version 2 or 3) and, when its run has a manifest
    naming it, has the size recorded there: llama.cpp would crash or read garbage otherwise."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise AppError(f"{path.name} is empty (0 bytes): not a GGUF file; export it again")
    if len(head) < 8 or head[:4] != b"GGUF":
        raise AppError(f"{path.name} is not a GGUF file (bad magic: it starts with {head[:4]!r}, not b'GGUF')")
    if int.from_bytes(head[4:8], "little") not in (2, 3):
        raise AppError(f"{path.name} is GGUF version {int.from_bytes(head[4:8], 'little')}, which this llama.cpp "
                       f"does not read (2 or 3)")
    manifest = path.parent.parent / "manifest.json"
    if manifest.is_file():
        entry = json.loads(manifest.read_text())["files"].get(f"{path.parent.name}/{path.name}")
        if entry and entry["bytes"] != path.stat().st_size:
            raise AppError(f"{path.name} is {path.stat().st_size} bytes but its run's manifest says "
                           f"{entry['bytes']}: the file is damaged or incomplete")


GiB = 2**30
GPU_HEADROOM = 1.5 * GiB  # beside the weights: the context's KV cache and llama.cpp's compute buffers


def gpu_layers_for(file_bytes: int, layers: int, free_gpu: int | None, offload: bool) -> int:
    """Pure: how many of a GGUF's layers go on the GPU. Every one (-1) when the whole file fits the free
    memory with GPU_HEADROOM to spare; else as many as fit (the embeddings and the output layer count as
    two more); none without a GPU, or with a llama.cpp built without GPU support (`make setup GPU=1`)."""
    if not offload or not free_gpu:
        return 0
    budget = free_gpu - GPU_HEADROOM
    if file_bytes <= budget:
        return -1
    return max(0, min(layers, int(budget // (file_bytes / (layers + 2)))))


def gpu_layers(path: Path) -> tuple[int, str]:
    """(n_gpu_layers for the file here, why): gpu_layers_for on this machine's measures. torch is asked for
    the free GPU memory only when llama.cpp can use a GPU at all."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return 0, "llama.cpp runs on the CPU (built without GPU support)"
    import torch
    if not torch.cuda.is_available():
        return 0, "llama.cpp runs on the CPU (no GPU visible)"
    free = torch.cuda.mem_get_info()[0]
    layers = int(gguf_field(path, "block_count") or 0)
    n = gpu_layers_for(path.stat().st_size, layers, free, True)
    where = ("every layer on the GPU" if n == -1 else f"{n} of {layers} layers on the GPU, the rest on the CPU"
             if n else "on the CPU")
    return n, f"{where} ({path.stat().st_size / GiB:.1f} GiB file, {free / GiB:.1f} GiB of GPU memory free)"


def gguf_field(path: Path, key: str):
    """A value of the GGUF's header, `key` under its architecture (block_count -> llama.block_count), read
    with gguf-py without loading the tensors; None when absent."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    arch = bytes(arch.parts[arch.data[0]]).decode() if arch else ""
    field = reader.fields.get(f"{arch}.{key}") or reader.fields.get(key)
    return field.parts[field.data[0]].tolist()[0] if field else None


def open_gguf(path: Path, n_gpu_layers: int | str = "auto", **kwargs):
    """llama_cpp.Llama(model_path=path, **kwargs), the one way the app opens a GGUF (chat, serve, compare,
    pairs, smoke), for a file that passes check_gguf_file. n_gpu_layers "auto": gpu_layers(). When the GPU
    cannot hold what was asked, the file is opened again on the CPU, with a warning; AppError when
    llama.cpp still cannot load it, in words that tell a damaged file from missing memory."""
    from llama_cpp import Llama

    check_gguf_file(path)
    if n_gpu_layers == "auto":
        n_gpu_layers, why = gpu_layers(path)
        logger.info(f"{path.name}: {why}")
    try:
        return Llama(model_path=str(path), n_gpu_layers=n_gpu_layers, **kwargs)
    except ValueError as e:
        error = gguf_load_error(path, e, kwargs.get("n_ctx"))
        if n_gpu_layers == 0 or error is None:
            raise error or e from None
        logger.warning(f"llama.cpp could not fit {path.name} on the GPU ({e}): out of GPU memory; running it on "
                       f"the CPU instead (slower)")
    try:
        return Llama(model_path=str(path), n_gpu_layers=0, **kwargs)
    except ValueError as e:
        raise gguf_load_error(path, e, kwargs.get("n_ctx")) or e from None


def gguf_load_error(path: Path, error: Exception, n_ctx: int | None = None) -> AppError | None:
    """The one-sentence error for llama-cpp-python's failures to load a model or to make its context (None
    for other errors). Said after a retry on the CPU, so memory is not the GPU's."""
    if "Failed to create llama_context" in str(error):
        return AppError(f"llama.cpp loaded {path.name} but could not make its context"
                        + (f" of {n_ctx} tokens" if n_ctx else "") + ": not enough memory for it; a smaller "
                        "context (--ctx) or a smaller GGUF type needs less")
    if "Failed to load model" not in str(error):
        return None
    return AppError(f"llama.cpp could not load {path.name}: the file is damaged or incomplete (a copy or "
                    f"download cut short?) or holds a model this llama.cpp does not support; export it again")
