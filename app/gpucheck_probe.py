"""gpu-check's probe, a child process of its own: Unsloth imported first, as training imports it, then what it
decided (the attention backend), the GPU, llama.cpp and the versions, written as JSON for app/gpucheck.py.

    python -m app.gpucheck_probe OUT.json   (run_gpu_check starts it while the model is built)
"""
import contextlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
from pathlib import Path

PACKAGES = ("torch", "unsloth", "unsloth_zoo", "trl", "transformers", "peft", "accelerate", "bitsandbytes",
            "datasets", "xformers", "flash_attn", "llama_cpp_python")


def probe(out_path: Path):
    """In its own process, as training will: Unsloth first, then what it decided; llama.cpp; versions."""
    info = {"unsloth_import": "ok"}
    try:
        from app.model import import_unsloth
        import_unsloth()
    except Exception as e:
        info["unsloth_import"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    import torch
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda (torch)"] = torch.version.cuda
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            versions["cuda driver"] = ".".join(map(str, divmod(torch._C._cuda_getDriverVersion() // 10, 100)))
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "total_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                       "bf16": torch.cuda.is_bf16_supported()}
    info["versions"] = versions
    info["attention"] = attention_backend(versions)
    info["llama_cpp"] = llama_cpp_state(versions)
    Path(out_path).write_text(json.dumps(info, indent=2))


def attention_backend(versions: dict) -> dict:
    """Unsloth's choice (unsloth/models/_utils.py decides HAS_FLASH_ATTENTION and whether xformers loads;
    unsloth/utils/attention_dispatch.py probes xformers' kernel and orders flash-attn, xformers, SDPA), read
    after import, nothing patched. On a CPU Unsloth runs stock transformers: the model's attn_implementation."""
    import torch
    state = {"flash_attn_installed": versions.get("flash_attn"), "xformers_installed": versions.get("xformers")}
    dispatch = sys.modules.get("unsloth.utils.attention_dispatch")
    if dispatch is None and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            import unsloth.utils.attention_dispatch as dispatch
    if dispatch is None or not torch.cuda.is_available():
        impl = transformers_attention()
        state.update(backend=impl, source="transformers (Unsloth's CPU backend has no attention kernels of its own)",
                     summary=f"{impl}: transformers' own (Unsloth's CPU backend), "
                             f"xformers {'installed' if versions.get('xformers') else 'not installed'}")
        return state
    utils = sys.modules.get("unsloth.models._utils")
    flash = bool(getattr(dispatch, "HAS_FLASH_ATTENTION", False))
    xformers_loaded = getattr(utils, "xformers", None) is not None if utils else None
    xformers_runs = bool(getattr(dispatch, "HAS_XFORMERS", False))
    choice = dispatch.select_attention_backend(False)
    backend = {"flash_dense": "flash-attn", "flash_varlen": "flash-attn", "xformers": "xformers", "sdpa": "SDPA"}.get(choice, choice)
    why = []
    if not flash:
        why.append("flash-attn " + ("installed but broken (Unsloth's import check failed)" if versions.get("flash_attn")
                                    else "not installed"))
    if not versions.get("xformers"):
        why.append("xformers not installed")
    elif xformers_loaded is False:
        why.append(f"xformers {versions['xformers']} installed but does not load with torch {versions.get('torch')} "
                   f"(Unsloth falls back to SDPA)")
    elif not xformers_runs:
        why.append(f"xformers {versions['xformers']} loads but its kernel does not run on this GPU (Unsloth's probe)")
    state.update(backend=backend, flash_attention=flash, xformers_loaded=xformers_loaded, xformers_runs=xformers_runs,
                 source="unsloth select_attention_backend()",
                 summary=f"{backend}" + (f" ({'; '.join(why)})" if why and backend != "flash-attn" else "")
                 + "; padded batches use SDPA whatever the choice (Unsloth's Llama attention, with a mask)")
    return state


def transformers_attention() -> str:
    """The attention implementation transformers gives a Llama here by default (sdpa, eager, ...)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        return str(LlamaForCausalLM(config).config._attn_implementation)
    except Exception as e:
        return f"unknown ({type(e).__name__})"


def llama_cpp_state(versions: dict) -> dict:
    if importlib.util.find_spec("llama_cpp") is None:
        return {"installed": False, "gpu_offload": None,
                "summary": "llama-cpp-python is not installed: no GGUF export or smoke test here"}
    try:
        import llama_cpp
        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as e:
        return {"installed": False, "gpu_offload": None,
                "summary": f"llama-cpp-python {versions.get('llama_cpp_python')} does not load: {type(e).__name__}: {e}"}
    import torch
    where = ("smoke runs on the GPU (n_gpu_layers=-1)" if offload and torch.cuda.is_available() else
             "a CPU build: smoke runs on the CPU (GPU users: `make setup GPU=1` builds it with CUDA)" if not offload
             else "built with GPU offload, but no GPU is visible here")
    return {"installed": True, "version": versions.get("llama_cpp_python"), "gpu_offload": offload,
            "summary": f"llama-cpp-python {versions.get('llama_cpp_python')}, llama_supports_gpu_offload() = {offload}: {where}"}



if __name__ == "__main__":
    probe(Path(sys.argv[1]))
