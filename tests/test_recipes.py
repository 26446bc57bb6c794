"""Every recipe loads and documents how to run it; recipe keys are TRL's own DPOConfig fields."""
import dataclasses

import pytest

from app.recipe import RECIPES, dpo_config_fields, load_recipe, recipe_names


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads_and_its_header_says_how_to_run_it(name):
    recipe = load_recipe(name)
    header = (RECIPES / f"{name}.yaml").read_text().split("\n\n")[0]
    assert header.startswith(f"# {name}:") and "make dpo" in header
    assert set(recipe.dpo) <= dpo_config_fields()


def test_recipe_fields_are_exactly_trl_dpoconfig_fields():
    from trl import DPOConfig
    assert dpo_config_fields() == {f.name for f in dataclasses.fields(DPOConfig) if f.init}


def test_overrides_change_single_keys_and_are_parsed_as_yaml():
    recipe = load_recipe("tiny", ["dpo.beta=0.2", "dpo.max_steps=7", "export.gguf=[f16]", "lora.r=4"])
    assert recipe.dpo["beta"] == 0.2 and recipe.dpo["max_steps"] == 7
    assert recipe.export["gguf"] == ["f16"] and recipe.lora["r"] == 4
    assert recipe.lora["lora_alpha"] == 32  # the rest of the recipe stays
