"""Everything about GGUF files in one place: the types the app writes and what each must reach in the smoke
test, a file's type, finding a run's GGUF, the header check, and opening one in llama.cpp.

Files are named <recipe>-<type>.gguf (export.py); gguf_type reads the type back from the name.
"""
import json
from pathlib import Path

from app import AppError
from app.runs import resolve_run

CONVERTED = ("f32", "f16", "bf16")  # written by the converter itself
QUANTIZED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
             "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
             "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}  # made from the f16 (or f32) file
GGUF_TYPES = (*CONVERTED, *QUANTIZED)
# bits per weight of each type, llama.cpp's figures rounded up (k-quants mix types across tensors): disk estimates
GGUF_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_0": 4.6}
CHAT_PREFERENCE = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16", "bf16", "f32", "q4_0")  # for chat and Ollama

# per type: max |logit diff| as a share of the reference's largest logit, and top-1 agreement. The reference
# runs at the merged model's own 16-bit dtype, whose rounding dominates the f32/f16/bf16 error (tiny, bf16
# reference: 0.09 of 21, against 0.007 with a float32 one); those must agree on every decisive token (smoke.py).
# For quantized types the top-1 agreement is counted where the reference's choice is clear of the file's error
# spread, and the logit bound is a loose sanity check (tiny: q8_0 0.35, q4_k_m 6.2 of 21). Shares, not absolute
# values: the logits' range is the model's.
THRESHOLDS = {
    "f32": (0.02, 1.0), "f16": (0.02, 1.0), "bf16": (0.03, 1.0),
    "q8_0": (0.06, 0.98), "q6_k": (0.1, 0.97), "q5_k_m": (0.15, 0.95), "q4_k_m": (0.45, 0.9), "q4_0": (0.5, 0.85),
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


def open_gguf(path: Path, **kwargs):
    """llama_cpp.Llama(model_path=path, **kwargs) for a GGUF that passes check_gguf_file; AppError when
    llama.cpp still cannot load it (cut short inside, damaged, or an architecture it does not know)."""
    from llama_cpp import Llama

    check_gguf_file(path)
    try:
        return Llama(model_path=str(path), **kwargs)
    except ValueError as e:
        raise gguf_load_error(path, e) or e from None


def gguf_load_error(path: Path, error: Exception) -> AppError | None:
    """The one-sentence error for llama-cpp-python's "Failed to load model" (None for other errors)."""
    if "Failed to load model" not in str(error):
        return None
    return AppError(f"llama.cpp could not load {path.name}: the file is damaged or incomplete (a copy or "
                    f"download cut short?) or holds a model this llama.cpp does not support; export it again")

