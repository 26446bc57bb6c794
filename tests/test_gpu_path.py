"""The decisions the GPU path makes, as pure functions of measured numbers, on the numbers of 12, 16, 24 and 80 GB
cards (no GPU here): where smoke's reference and each GGUF run, which mixed precision the trainer gets, the
batch of the up-front reference pass, and TRL's defaults where Unsloth's generated configs would put their own.
Meta-Llama-3-8B's sizes: 8.03B parameters, 32 layers; f16 GGUF 15.0 GiB, q4_k_m 4.6 GiB."""
import subprocess

import pytest

from app import ROOT

GiB = 2**30
PARAMS, LAYERS = 8.03e9, 32
F16, Q4 = int(15.0 * GiB), int(4.6 * GiB)
CARDS = {"12 GB": 11.0 * GiB, "16 GB": 15.0 * GiB, "24 GB": 23.0 * GiB, "80 GB": 78.0 * GiB}  # free after the context


def test_smoke_reference_goes_where_float32_fits_and_never_on_a_card_too_small():
    from app.smoke import reference_placement

    host = 32 * GiB
    placed = {card: reference_placement(int(PARAMS), 2, free, host) for card, free in CARDS.items()}
    assert (placed["80 GB"]["device"], placed["80 GB"]["dtype"]) == ("cuda", "float32")  # 30 GiB + 1
    for card in ("12 GB", "16 GB", "24 GB"):  # float32 is 30 GiB: part on the card, the rest in host memory
        assert (placed[card]["device"], placed[card]["dtype"]) == ("cuda+cpu", "float32"), card
        assert placed[card]["max_memory"]["gpu"] < CARDS[card]
    # a 16 GB card in a 16 GB machine: float32 fits nowhere, the 16-bit weights split
    small = reference_placement(int(PARAMS), 2, CARDS["16 GB"], 16 * GiB)
    assert (small["device"], small["dtype"]) == ("cuda+cpu", "16-bit")
    assert reference_placement(int(PARAMS), 2, None, 64 * GiB)["device"] == "cpu"  # no GPU: the host
    assert reference_placement(int(PARAMS), 2, None, 8 * GiB)["device"] == "none"  # said, not crashed into


def test_each_gguf_gets_the_layers_that_fit():
    from app.gguf import gpu_layers_for

    assert gpu_layers_for(F16, LAYERS, CARDS["80 GB"], True) == -1
    assert gpu_layers_for(F16, LAYERS, CARDS["24 GB"], True) == -1
    sixteen, twelve = gpu_layers_for(F16, LAYERS, CARDS["16 GB"], True), gpu_layers_for(F16, LAYERS, CARDS["12 GB"], True)
    assert 0 < twelve < sixteen < LAYERS  # the f16 file never fits a 12 or 16 GB card whole
    assert sixteen * F16 / (LAYERS + 2) + 1.5 * GiB <= CARDS["16 GB"]
    assert gpu_layers_for(Q4, LAYERS, CARDS["12 GB"], True) == -1
    assert gpu_layers_for(Q4, LAYERS, CARDS["24 GB"], False) == 0  # llama.cpp built without GPU support
    assert gpu_layers_for(Q4, LAYERS, None, True) == 0


def test_mixed_precision_follows_the_dtype_unsloth_loaded():
    import torch

    from app.train import mixed_precision

    assert mixed_precision(True, torch.float16) == {"bf16": False, "fp16": True}  # a T4: bf16 only emulated
    assert mixed_precision(True, torch.bfloat16) == {"bf16": True, "fp16": False}
    assert mixed_precision(False, torch.bfloat16) == {"bf16": False, "fp16": False}
    assert mixed_precision(True, torch.float32) == {"bf16": False, "fp16": False}


def test_trls_defaults_stand_where_unsloth_would_put_its_own():
    from app.train import trl_defaults_unsloth_replaces, unsloth_replaced_fields

    replaced = unsloth_replaced_fields()  # parsed from the installed unsloth/models/rl.py
    assert {"weight_decay", "per_device_eval_batch_size", "eval_accumulation_steps", "learning_rate", "seed"} <= replaced
    dpo = trl_defaults_unsloth_replaces("dpo")
    assert (dpo["weight_decay"], dpo["per_device_eval_batch_size"], dpo["eval_accumulation_steps"], dpo["seed"]) == \
        (0.0, 8, None, 42)  # Unsloth's: 0.001, 4, 2, 3407


@pytest.mark.parametrize("free_gib", [10.0, 40.0])
def test_the_reference_pass_batch_fits_the_memory_free(free_gib):
    from app.memory import reference_pass_batch, reference_pass_gib
    from app.recipe import load_recipe

    recipe = load_recipe("llama3-8b")
    batch = reference_pass_batch(recipe, free_gib, floor=2)
    assert batch >= 2 and reference_pass_gib(recipe, batch) + 1.0 <= free_gib
    assert batch == 64 or reference_pass_gib(recipe, 2 * batch) + 1.0 > free_gib
    assert reference_pass_batch(recipe, 1.0, floor=2) == 2  # nothing fits: the training batch, which trained


def test_a_gpu_setup_is_a_setup_of_its_own_and_builds_for_this_gpu():
    def dry(*args):
        return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True).stdout

    gpu = dry("setup", "GPU=1")
    assert "-DGGML_CUDA=on" in gpu and "-DCMAKE_CUDA_ARCHITECTURES=native" in gpu and "echo '1' > .venv/.gpu" in gpu
    assert "-DGGML_CUDA=on" not in dry("setup", "GPU=0")
    # whatever the CPU setup did, a GPU one has its own stamp, so it runs (a CPU stamp cannot satisfy it)
    assert "pip install" in gpu


def test_preflight_says_where_smoke_runs_and_warns_of_a_cpu_llama_cpp(caplog):
    from app.memory import ARCHITECTURES
    from app.preflight import check_after_training
    from app.recipe import load_recipe

    recipe, arch = load_recipe("llama3-8b"), ARCHITECTURES["unsloth/llama-3-8b-instruct-bnb-4bit"]
    card = {"free": 16 * GiB, "total": 16 * GiB, "name": "RTX 4080"}
    line = check_after_training(recipe, arch, card, offload=True)
    assert "split between the GPU and host memory" in line or "on the CPU" in line
    assert "f16 15.0 GiB" in line and "layers on the GPU" in line and "q4_k_m 4.6 GiB on the GPU" in line
    assert not caplog.records
    assert "f16 15.0 GiB on the CPU" in check_after_training(recipe, arch, card, offload=False)
    assert "built without GPU support" in caplog.text and "make setup GPU=1" in caplog.text
