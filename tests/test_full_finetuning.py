"""Full fine-tuning (model.full_finetuning: true): every weight trains, the export saves them with no merge,
and llama.cpp's GGUF still behaves like the trained model. DPO's reference is TRL's own either way: one
pass of the starting weights before training (auto, true) or a frozen copy (false), with the same losses."""
import json
import logging

import pytest

from app import AppError
from app.cli import main
from app.recipe import load_recipe
from tests.conftest import read_jsonl, run_folders

FULL = ["--set", "model.full_finetuning=true", "--set", "export.gguf=[f16]"]


def test_the_recipe_says_what_full_finetuning_leaves_unused(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="app.recipe"):
        recipe = load_recipe("tiny", ["model.full_finetuning=true"])
    assert "its lora section and model.load_in_4bit are not used" in caplog.text
    assert recipe.model.load_in_4bit is False  # what runs, in the run's recipe.yaml too
    reward = tmp_path / "reward.yaml"
    reward.write_text("base: tiny\nstages: [reward]\nmodel: {full_finetuning: true}\n")
    with pytest.raises(AppError, match="a reward model trains LoRA and its score head"):
        load_recipe(str(reward))


@pytest.mark.slow
def test_full_finetuning_dpo_changes_every_decoder_weight_exports_and_passes_smoke(new_runs, capsys):
    import torch
    from safetensors.torch import load_file

    from app.tiny import CACHE

    assert main(["dpo", "tiny", *FULL, "--set", "dpo.max_steps=30"]) == 0  # half the recipe: 0.693 -> 0.0003 at 60
    new_runs("tiny-dpo-")  # removed afterwards
    out = capsys.readouterr().out
    (run,) = run_folders(out)
    assert "full fine-tuning: nothing to merge" in out and not (run / "adapter").exists()
    evals = [r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.1, evals  # measured 0.693 -> 0.0003 (log-prob accuracy 33% -> 100%)
    train = json.loads((run / "train.json").read_text())
    assert train["reference"]["precomputed"] and train["preference"]["trained"]["reward_accuracy"] >= 0.9

    # every weight of the decoder moved: compared in bfloat16, the merged files' dtype, so a change below
    # bf16 rounding would not count (measured: every tensor, most of their values)
    base = {k: v.to(torch.bfloat16) for k, v in load_file(str(CACHE / "model.safetensors")).items()}
    trained = load_file(str(run / "merged" / "model.safetensors"))
    decoder = [k for k in base if k.startswith("model.layers.")]
    assert len(decoder) == 4 * 9 and set(decoder) <= set(trained)  # 4 layers x (7 projections + 2 norms)
    unchanged = [k for k in decoder if torch.equal(base[k], trained[k])]
    assert not unchanged, f"full fine-tuning left {unchanged} as they were"
    share = sum(int((base[k] != trained[k]).sum()) for k in decoder) / sum(base[k].numel() for k in decoder)
    assert share > 0.5, share
    smoke = json.loads((run / "smoke.json").read_text())
    assert [r["passed"] for r in smoke["results"]] == [True]

    # `export RUN` redoes the export from the saved weights (there is no adapter to reload)
    assert main(["export", str(run)]) == 0
    assert "0.00 ulp (full fine-tuning" in capsys.readouterr().out


@pytest.mark.slow
def test_trl_s_frozen_copy_and_its_precomputed_pass_give_the_same_losses(new_runs, capsys):
    """The two references TRL offers in full fine-tuning are the same starting weights: the loss curves of
    20 steps agree to 1e-4 (float32 on one machine: measured equal to the 4 printed decimals)."""
    curves = []
    for setting in ("true", "false"):
        assert main(["dpo", "tiny", *FULL, "--set", "dpo.max_steps=20", "--set",
                     f"dpo.precompute_ref_log_probs={setting}"]) == 0
        new_runs("tiny-dpo-")
        (run,) = run_folders(capsys.readouterr().out)
        curves.append([r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r])
        assert json.loads((run / "train.json").read_text())["reference"]["precomputed"] is (setting == "true")
    assert len(curves[0]) == 4 and curves[0] == pytest.approx(curves[1], abs=1e-4), curves

