"""Every recipe loads and documents how to run it; method sections are TRL's own config fields."""
import dataclasses
import importlib

import pytest

from app import AppError
from app.methods import METHODS
from app.recipe import RECIPES, dpo_loss_types, load_recipe, recipe_names, trl_config_fields


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads_and_its_header_says_how_to_run_it(name):
    recipe = load_recipe(name)
    header = (RECIPES / f"{name}.yaml").read_text().split("\n\n")[0]
    assert header.startswith(f"# {name}:") and f"make {recipe.stages[-1]}" in header
    for method in METHODS:
        assert set(recipe.methods[method]) <= trl_config_fields(method)


@pytest.mark.parametrize("method", METHODS)
def test_recipe_fields_are_exactly_the_trl_config_fields(method):
    module = "trl.experimental.orpo" if method == "orpo" else "trl"
    config = getattr(importlib.import_module(module), METHODS[method].config)
    assert trl_config_fields(method) == {f.name for f in dataclasses.fields(config) if f.init}


def test_dpo_loss_types_are_trl_s_own_list():
    from trl import DPOConfig
    losses = dpo_loss_types()
    assert {"sigmoid", "ipo", "hinge", "robust"} <= set(losses)
    # bf16 off: TRL defaults to it and transformers refuses it on a CPU-only machine
    assert DPOConfig(output_dir="/tmp/x", loss_type=losses[1], bf16=False).loss_type == [losses[1]]
    assert load_recipe("tiny", ["dpo.loss_type=ipo"]).methods["dpo"]["loss_type"] == "ipo"
    with pytest.raises(AppError, match="dpo.loss_type 'sigmod' is not one TRL's DPOTrainer knows"):
        load_recipe("tiny", ["dpo.loss_type=sigmod"])


def test_a_recipe_with_a_base_overrides_it_key_by_key():
    recipe = load_recipe("tiny-sft-dpo")
    assert recipe.stages == ["sft", "dpo"] and recipe.name == "tiny-sft-dpo"
    assert recipe.methods["sft"]["max_steps"] == 20 and recipe.methods["sft"]["learning_rate"] == load_recipe("tiny").methods["sft"]["learning_rate"]
    with pytest.raises(AppError, match="stages must be a list of methods"):
        load_recipe_with_stages(["sft", "dpoo"])
    with pytest.raises(AppError, match="ppo: PPO is not offered: TRL removed"):
        load_recipe_with_stages(["sft", "ppo"])


def load_recipe_with_stages(stages):
    import tempfile
    from pathlib import Path

    import yaml
    path = Path(tempfile.mkdtemp()) / "r.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny", "stages": stages}))
    return load_recipe(str(path))


def test_overrides_change_single_keys_and_are_parsed_as_yaml():
    recipe = load_recipe("tiny", ["dpo.beta=0.2", "dpo.max_steps=7", "export.gguf=[f16]", "lora.r=4"])
    assert recipe.methods["dpo"]["beta"] == 0.2 and recipe.methods["dpo"]["max_steps"] == 7
    assert recipe.export.gguf == ["f16"] and recipe.lora.r == 4
    assert recipe.lora.lora_alpha == 32  # the rest of the recipe stays
