"""Preflight: passes on tiny in seconds; each failure is one sentence with its fix, before any model loads."""
import json
import shutil
import time

import pytest
import yaml

from app import ROOT, AppError
from app.memory import GiB, architecture, with_training_changes
from app.preflight import check_gpu_memory, run_preflight
from app.recipe import load_recipe
from app.tiny import CHAT_TEMPLATE, ensure_model

TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def recipe_with_model(tmp_path, folder):
    """The tiny recipe with model.name pointing at `folder`, which gets placeholder weights: preflight checks
    that a folder has safetensors (app.model.check_model_folder) but never loads them."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"placeholder": np.zeros(1, dtype=np.float32)}, str(folder / "model.safetensors"))
    raw = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    raw["model"]["name"] = str(folder)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(str(path))


def assert_one_sentence(error: AppError, *words):
    text = str(error)
    assert "\n" not in text and "fix:" in text, text
    for word in words:
        assert word in text, text


@pytest.mark.slow  # builds the tiny model when it is not built yet (3 minutes)
def test_passes_on_tiny(tmp_path):
    """Twice: the first run checks the tokenizer in the child process; the second finds the result cached."""
    ensure_model()
    t0 = time.monotonic()
    lines = run_preflight(load_recipe("tiny"), cache=tmp_path).lines
    cold = time.monotonic() - t0
    assert all(line.startswith("ok: ") for line in lines), lines
    text = "\n".join(lines)
    for check in ("versions:", "converter:", "model:", "data:", "disk:", "tokenizer:", "template:", "GPU memory:"):
        assert f"ok: {check}" in text, text
    assert "tokenizes the chat prompt as transformers does" in text and "cached" not in text
    import torch
    if not torch.cuda.is_available():
        assert "no GPU is present" in text

    t0 = time.monotonic()
    again = run_preflight(load_recipe("tiny"), cache=tmp_path).lines
    warm = time.monotonic() - t0
    tokenizer_line = next(line for line in again if line.startswith("ok: tokenizer:"))
    assert "tokenizes the chat prompt as transformers does" in tokenizer_line and "(cached" in tokenizer_line, again
    assert len(again) == len(lines)
    print(f"preflight on tiny: {cold:.1f}s, then {warm:.1f}s with the tokenizer result cached")


def test_a_pin_that_does_not_match(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nPyYAML==6.0.3\ntorch==0.0.1\nnumpy==0.0.2\n")
    with pytest.raises(AppError) as e:
        run_preflight(load_recipe("tiny"), requirements=requirements)
    assert_one_sentence(e.value, "torch", "==0.0.1", "(1 more differ)", "make setup")


def test_a_missing_converter(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AppError) as e:
        run_preflight(load_recipe("tiny"), llamacpp_home=tmp_path / "empty")
    assert_one_sentence(e.value, "converter is missing", "make setup")


def test_too_little_disk(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * GiB, 10 * GiB - 2**20, 2**20))
    with pytest.raises(AppError) as e:
        run_preflight(load_recipe("tiny"))
    assert_one_sentence(e.value, "0.0 GiB free", "merged 16-bit weights", "free some space")


@pytest.mark.slow  # builds the tiny model when it is not built yet (3 minutes)
def test_a_chat_template_without_eos(tmp_path):
    tiny = ensure_model()
    folder = tmp_path / "no-eos"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny / name, folder / name)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("{{ eos_token }}", ""))
    with pytest.raises(AppError) as e:
        run_preflight(recipe_with_model(tmp_path, folder))
    assert_one_sentence(e.value, "does not end the assistant's reply", "</s>", "model.chat_template")


@pytest.mark.slow  # builds the tiny model when it is not built yet (3 minutes)
def test_an_unknown_bpe_pre_tokenizer(tmp_path):
    """A home-trained byte-level BPE tokenizer: llama.cpp's converter does not know its pre-tokenizer, which
    export would find out only after training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    lines = (ROOT / "recipes" / "data" / "tiny_corpus.txt").read_text().splitlines()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = CHAT_TEMPLATE
    folder = tmp_path / "bpe"
    wrapped.save_pretrained(str(folder))
    config = json.loads((ensure_model() / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": len(wrapped), "bos_token_id": 0,
                                                    "eos_token_id": 1, "pad_token_id": None}))
    with pytest.raises(AppError) as e:
        run_preflight(recipe_with_model(tmp_path, folder))
    assert_one_sentence(e.value, "converter cannot write the vocabulary", "pre-tokenizer was not recognized")


@pytest.mark.slow
def test_a_tokenizer_that_crashes_llama_cpp_is_blamed_not_the_environment(tmp_path):
    """SmolLM2's tokenizer as transformers imports it from a GGUF (byte fallback, an SPM decoder): the converter
    writes it, and llama.cpp aborts while reading it back (unordered_map::at), killing the child. The sentence
    names the tokenizer's layout; `make setup` would not help."""
    from transformers import AutoTokenizer

    from app.smollm2 import ensure_model as ensure_smollm2, package_gguf

    folder = tmp_path / "lossy"
    AutoTokenizer.from_pretrained(str(package_gguf().parent), gguf_file=package_gguf().name).save_pretrained(str(folder))
    shutil.copy(ensure_smollm2() / "config.json", folder / "config.json")
    with pytest.raises(AppError) as e:
        run_preflight(recipe_with_model(tmp_path, folder), cache=None)
    assert_one_sentence(e.value, "llama.cpp crashed while loading the vocabulary its converter wrote", "tokenizer's layout",
                        "tokenizer.json")
    assert "make setup" not in str(e.value)


def test_offline_mode_needs_the_model_in_the_cache(monkeypatch):
    """HF_HUB_OFFLINE set: no hub call; a hub model that is not cached stops here, in training's own words."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(AppError) as e:
        run_preflight(load_recipe("llama3-8b"))
    text = str(e.value)
    assert "\n" not in text and "is not in the local Hugging Face cache and the hub cannot be reached" in text, text
    assert time.monotonic() - t0 < 15  # no network probe, no wait for the child


def test_gpu_memory_check_and_auto_fit_without_a_gpu():
    """The GPU figures come from torch.cuda.mem_get_info in the child; here they are given directly."""
    recipe = load_recipe("llama3-8b", ["model.auto_fit=true"])
    arch, source = architecture(recipe)
    gpu = {"free": 9 * GiB, "total": 12 * GiB, "name": "a 12 GB GPU"}
    line, changes = check_gpu_memory(recipe, arch, source, gpu)
    assert "auto_fit: batch 1 x accumulation 8" in line and "fits" in line, line
    assert changes == {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8}
    fitted = with_training_changes(recipe, changes)  # returned for the caller to apply (pipeline.train_recipe)
    assert (fitted.methods["dpo"]["per_device_train_batch_size"], fitted.methods["dpo"]["gradient_accumulation_steps"]) == (1, 8)
    assert recipe.methods["dpo"]["per_device_train_batch_size"] == 2  # the recipe given is not changed

    plain = load_recipe("llama3-8b")
    with pytest.raises(AppError) as e:
        check_gpu_memory(plain, arch, source, gpu)
    assert_one_sentence(e.value, "GiB of GPU memory", "FIT=1")
    assert "of 80.0 GiB free" in check_gpu_memory(plain, arch, source, {**gpu, "free": 80 * GiB})[0]
