"""The model stage: Unsloth loads the base model and attaches LoRA; one call path on CPU and GPU.

Unsloth picks its backend: CUDA kernels on a GPU, stock transformers + PEFT on a CPU ("no GPU found,
training on CPU"). Nothing here branches on the device except the check that a recipe which needs a GPU
gets one, and that a hub model is either cached or reachable, both said before anything is loaded.
"""
import logging
import os
import socket
from pathlib import Path

from app import ROOT, AppError


def resolve_model_source(recipe) -> str:
    """'tiny' -> the locally built model; a folder -> itself; anything else is a hub id."""
    import_unsloth()
    name = str(recipe.model["name"])
    if name == "tiny":
        from app.tiny import ensure_tiny_model
        return str(ensure_tiny_model())
    for candidate in (Path(name), ROOT / name):
        if candidate.is_dir():
            return str(candidate.resolve())
    return name


def check_model_environment(recipe):
    """One sentence saying what is missing when the recipe cannot run here (GPU, model files, network)."""
    import torch

    name = str(recipe.model["name"])
    needs_gpu = recipe.model.get("requires_gpu") and not torch.cuda.is_available()
    local = name == "tiny" or Path(name).is_dir() or (ROOT / name).is_dir()
    missing_model = not local and not is_cached(name) and not hub_reachable()
    problems = []
    if needs_gpu:
        problems.append("it needs a CUDA GPU and none is visible to torch")
    if missing_model:
        problems.append(f"model '{name}' is not in the local Hugging Face cache and the hub cannot be reached "
                        f"(no network)")
    if problems:
        raise AppError(f"recipe '{recipe.name}' cannot run here: {' and '.join(problems)}"
                       + ("; a GPU recipe can be forced onto the CPU with --set model.requires_gpu=false, slowly" if needs_gpu else ""))
    if not local and is_cached(name):
        os.environ.setdefault("HF_HUB_OFFLINE", "0" if hub_reachable() else "1")


def is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def import_unsloth():
    """Unsloth, imported before transformers/TRL/PEFT (it patches them on import), ~20 s: only the stages
    that load a model call this. Two loggers are quieted: on a CPU they warn about optional GPU kernels."""
    for noisy in ("torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import unsloth
    return unsloth


def load_model(recipe, source: str):
    """(PEFT model with LoRA, tokenizer with a chat template) through Unsloth."""
    FastLanguageModel = import_unsloth().FastLanguageModel

    m, lora = recipe.model, recipe.lora
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=source, max_seq_length=m["max_seq_length"], dtype=_dtype(m["dtype"]),
        load_in_4bit=m["load_in_4bit"])
    tokenizer = fix_chat_template(tokenizer, m.get("chat_template"), recipe.name)
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
        target_modules=lora["target_modules"], bias=lora["bias"], use_rslora=lora.get("use_rslora", False),
        random_state=lora["random_state"], use_gradient_checkpointing="unsloth")
    return model, tokenizer


def load_trained_model(recipe, adapter_dir: Path):
    """The base with a run's adapter, through Unsloth (it reads the base from adapter_config.json)."""
    FastLanguageModel = import_unsloth().FastLanguageModel

    m = recipe.model
    return FastLanguageModel.from_pretrained(model_name=str(adapter_dir), max_seq_length=m["max_seq_length"],
                                             dtype=_dtype(m["dtype"]), load_in_4bit=m["load_in_4bit"])


def load_tokenizer(recipe):
    """The recipe's tokenizer with its chat template, without loading model weights (for data inspect)."""
    from transformers import AutoTokenizer

    name = str(recipe.model["name"])
    if name == "tiny":
        from app.tiny import ensure_tiny_model
        name = str(ensure_tiny_model())
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise AppError(f"could not load the tokenizer of '{name}' ({str(e).splitlines()[0]})") from None
    return fix_chat_template(tokenizer, recipe.model.get("chat_template"), recipe.name)


def fix_chat_template(tokenizer, template_name, recipe_name):
    """Apply the recipe's named template (Unsloth's library of them); a model without one is an error,
    because a GGUF without a template chats in the wrong layout and never stops."""
    if template_name:
        from unsloth.chat_templates import CHAT_TEMPLATES, get_chat_template
        if template_name not in CHAT_TEMPLATES:
            raise AppError(f"recipe '{recipe_name}': model.chat_template '{template_name}' is not one of "
                           f"Unsloth's: {', '.join(sorted(CHAT_TEMPLATES))}")
        tokenizer = get_chat_template(tokenizer, chat_template=template_name)
    if not getattr(tokenizer, "chat_template", None):
        raise AppError(f"recipe '{recipe_name}': the model's tokenizer has no chat template; set "
                       f"model.chat_template (e.g. llama-3, chatml, mistral, gemma, phi-3)")
    return tokenizer


def _dtype(name):
    import torch
    return None if name in (None, "auto") else getattr(torch, name)
