"""The memory planner: arithmetic on the architecture, no GPU needed (none was available when it was written)."""

import pytest

from app.memory import ARCHITECTURES, architecture, estimate_training_memory, fit_to_memory, parse_params
from app.recipe import load_recipe, recipe_names


def test_table_matches_the_recipes_parameter_counts():
    """The table's architectures give the parameter counts the recipes state (model.params), within 3%."""
    seen = set()
    for name in recipe_names():
        recipe = load_recipe(name)
        if recipe.model.name.lower() in ARCHITECTURES:
            arch, _ = architecture(recipe)
            stated = parse_params(recipe.model.params)
            assert abs(arch.params - stated) / stated < 0.03, (name, arch.params, stated)
            seen.add(recipe.model.name.lower())
    assert seen == set(ARCHITECTURES)  # every entry belongs to a recipe


def test_tiny_architecture_comes_from_its_config():
    arch, source = architecture(load_recipe("tiny"))
    assert (arch.hidden, arch.layers, arch.intermediate, arch.heads, arch.kv_heads) == (256, 4, 512, 4, 2)
    assert 2.5e6 < arch.params < 3.2e6  # recipes/tiny.yaml says 2.9M
    assert source.endswith("config.json") or source == "app/tiny.py"


@pytest.mark.parametrize("chunked", [True, False])
def test_estimate_grows_with_batch_and_length(chunked):
    recipe = load_recipe("llama3-8b")
    by_batch = [estimate_training_memory(recipe, batch=b, chunked=chunked).total for b in (1, 2, 4, 8)]
    by_length = [estimate_training_memory(recipe, length=n, chunked=chunked).total for n in (256, 512, 1024, 2048)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 4
    assert by_length == sorted(by_length) and len(set(by_length)) == 4
    tiny = load_recipe("tiny")
    assert estimate_training_memory(tiny, batch=2).total < estimate_training_memory(tiny, batch=16).total


def test_8b_in_4bit_at_batch_2_by_1024_is_plausible():
    """Llama-3-8B in 4-bit, batch 2 x max_length 1024 (4 sequences of chosen and rejected): between 7 and 16 GiB.

    Below 7 is impossible: the weights alone are ~5.3 GiB (7.0B linear parameters in NF4 = 3.35 GiB, plus the
    128k-vocabulary embedding and LM head in 16-bit = 1.96 GiB; Unsloth's checkpoint is 5.7 GB), and one
    checkpointed hidden state per layer for 4096 tokens is 1 GiB more, before any CUDA context. Above 16 would
    mean a term counted twice: even without the fused LM head, with the fp32 logits of policy and reference
    both alive (the worst case below), the sum stays under 14 GiB, and QLoRA DPO of an 8B at this shape is
    what 16 GB cards are used for."""
    recipe = load_recipe("llama3-8b")
    assert (recipe.methods["dpo"]["per_device_train_batch_size"], recipe.methods["dpo"]["max_length"]) == (2, 1024)
    est = estimate_training_memory(recipe)
    worst = estimate_training_memory(recipe, chunked=False)
    assert 5.0 < est.weights < 5.6
    assert 7 < est.total < 16 and 7 < worst.total < 16
    assert est.total < worst.total  # the fused LM head never builds the 4 x 1024 x 128256 logits


def test_precomputed_reference_leaves_the_reference_pass_out():
    recipe = load_recipe("qwen2.5-7b")
    with_ref = estimate_training_memory(recipe, chunked=False)
    without = estimate_training_memory(recipe, chunked=False, precompute_ref=True)
    assert with_ref.reference > 0 and without.reference == 0
    assert without.total < with_ref.total


def test_fit_picks_a_smaller_batch_for_a_smaller_budget_and_keeps_the_effective_batch():
    recipe = load_recipe("llama3-8b")  # batch 2 x accumulation 4
    before = dict(recipe.methods["dpo"])
    picked = {}
    for budget in (80, 12, 9):
        changes, sentence = fit_to_memory(recipe, budget)
        dpo = {**recipe.methods["dpo"], **changes}
        picked[budget] = dpo["per_device_train_batch_size"]
        assert dpo["per_device_train_batch_size"] * dpo["gradient_accumulation_steps"] == 8, sentence
        assert "fits" in sentence and "NOT" not in sentence, sentence
        assert estimate_training_memory(recipe, batch=picked[budget]).total <= budget
    assert picked[80] > picked[12] > picked[9] == 1, picked
    assert recipe.methods["dpo"] == before  # pure: the caller applies the changes


def test_fit_sets_precompute_when_even_batch_1_does_not_fit():
    recipe = load_recipe("llama3-8b")
    changes, sentence = fit_to_memory(recipe, 4.0)
    assert changes == {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
                       "precompute_ref_log_probs": True}
    assert "still does NOT fit" in sentence and "\n" not in sentence


def test_parse_params():
    assert parse_params("8.0B") == 8.0e9 and parse_params("2.9M") == 2.9e6 and parse_params(None) is None
    assert parse_params("big") is None


def test_full_finetuning_counts_every_weight_and_the_reference_copy_only_without_precompute():
    """SmolLM3-3B fully fine-tuned: 16-bit weights (no NF4), a gradient and two optimizer moments for every
    weight, and TRL's frozen reference copy (as large as the weights) unless the reference is scored once."""
    lora = load_recipe("smollm3-3b")
    full = load_recipe("smollm3-3b", ["model.full_finetuning=true"])
    arch, _ = architecture(full)
    optimizer = 2 if "8bit" in str(full.methods["dpo"].get("optim", "")) else 8
    copy = estimate_training_memory(full, precompute_ref=False)
    once = estimate_training_memory(full, precompute_ref=True)
    assert copy.weights * 2**30 == pytest.approx(arch.params * 2)  # bf16, every weight
    assert copy.trainable * 2**30 == pytest.approx(arch.params * (2 + optimizer))
    assert copy.reference_weights == copy.weights and once.reference_weights == 0
    assert copy.total - once.total >= copy.weights  # the copy, and its reference pass
    assert estimate_training_memory(full).reference_weights == 0  # auto: TRL's precompute (app/train.py)
    assert estimate_training_memory(lora).reference_weights == 0
    assert estimate_training_memory(lora).total < once.total  # LoRA on 4-bit is the small one
    from app.memory import reference_choices
    assert reference_choices(lora) is None
    assert f"{copy.total:.1f} GiB with a frozen copy" in reference_choices(full)
