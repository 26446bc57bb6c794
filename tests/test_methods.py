"""Every method trains the tiny model through the same stages, and its own objective improves.

sft, orpo and kto produce a causal LM, so they also go through export and smoke unchanged; reward
produces a scorer. Each test removes its run folders."""
import json
import os

import pytest

from app.cli import main
from app.runs import EXPORTS
from tests.conftest import read_jsonl

STEPS = 20  # for the sft -> dpo chain; sft, orpo and kto run their recipe's own steps


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "orpo", "kto"])
def test_each_method_lowers_its_loss_and_its_gguf_passes_smoke(method, new_runs):
    # the recipe's own steps (40 each), as `make sft|orpo|kto` runs them: at 20, KTO's held-out loss went
    # 0.5000 -> 0.5009 on the Intel build of tiny; at 40 it falls to 0.4962 (and log-prob accuracy 33% -> 70%)
    assert main([method, "tiny", "--set", "export.gguf=[f16]"]) == 0
    (run,) = new_runs(f"tiny-{method}-")
    # the held-out loss, on the same examples before and after: a training loss follows its batches (KTO's
    # rose 0.498 -> 0.511 over 20 steps on one machine while every held-out measure improved)
    evals = [r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0], f"{method} held-out loss did not fall: {evals}"
    train = json.loads((run / "train.json").read_text())
    assert train["method"] == method and train["steps"] == 40
    trained = train["preference"]["trained"]
    if method == "orpo":  # ORPO's first steps are mostly its NLL term: its own preference term, held out
        odds = [r["eval_log_odds_ratio"] for r in read_jsonl(run / "metrics.jsonl") if "eval_log_odds_ratio" in r]
        assert odds[-1] > odds[0], odds  # measured -0.206 -> -0.182
    else:  # chosen gained on rejected on most held-out pairs (measured: sft 77%, kto 73% of 30); the mean
        # margin moves little here, as the base already ranks curt replies it never saw very low
        assert trained["reward_accuracy"] > 0.5, trained
    smoke = json.loads((run / "smoke.json").read_text())
    assert [r["passed"] for r in smoke["results"]] == [True]


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs_above_chance_and_scores_replies(reward_run, capsys):
    run = reward_run
    train = json.loads((run / "train.json").read_text())
    assert train["preference"]["trained"]["accuracy"] >= 0.8  # 30 held-out pairs; chance is 0.5
    assert not (run / "gguf").exists() and (run / "report.md").is_file()
    capsys.readouterr()
    assert main(["score", str(run), "--prompt", "Tell me about bees.",
                 "--response", "Of course! Bees are insects that make honey. I hope this helps.",
                 "--response", "Not my problem."]) == 0
    polite, rude = (float(line.split()[0]) for line in capsys.readouterr().out.strip().splitlines())
    assert polite > rude


@pytest.mark.slow
def test_sft_then_dpo_starts_dpo_from_the_sft_weights(new_runs):
    assert main(["train", "tiny-sft-dpo", "--set", "sft.max_steps=10", "--set", "dpo.max_steps=10",
                 "--set", "export.gguf=[f16]"]) == 0
    (sft_run,), (dpo_run,) = new_runs("tiny-sft-dpo-sft-"), new_runs("tiny-sft-dpo-dpo-")
    dpo_recipe = (dpo_run / "recipe.yaml").read_text()
    assert str(sft_run / "merged") in dpo_recipe  # its base (and DPO's reference) is the SFT model
    assert json.loads((dpo_run / "train.json").read_text())["method"] == "dpo"
    assert all(r["passed"] for r in json.loads((dpo_run / "smoke.json").read_text())["results"])
    assert os.readlink(EXPORTS / "latest") == dpo_run.name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "orpo", "kto", "reward", "grpo"])
def test_every_method_runs_on_the_real_model_in_4_bit(method, new_runs):
    """SmolLM2-135M through each method at 3 steps, on the 4-bit path the GPU recipes take (the recipe trains
    in 16 bits: its header says why): training, then for the chat models the merge of the adapter TRL
    trained in bfloat16 (checked weight by weight, in this process), GGUF f16 and smoke; a reward model is
    measured on the held-out pairs instead. GRPO is scored by the recipe's reward functions."""
    args = [method, "smollm2-135m", "--set", "model.load_in_4bit=true", "--set", f"{method}.max_steps=3",
            "--set", f"{method}.logging_steps=1", "--set", "export.gguf=[f16]", "--set", "data.eval_pairs=8",
            "--set", 'export.probes=["What is a volcano?"]',
            # 80 rows: 72 to train on, 8 held out; TRL evaluates its whole held-out split at steps 0 and 3, and
            # at the recipe's 30 pairs KTO's two evaluations took 175 s of its 4 minutes on 2 cores
            "--set", "data.max_rows=80"]
    if method == "grpo":
        args += ["--set", "grpo.max_completion_length=24"]
    assert main(args) == 0
    (run,) = new_runs(f"smollm2-135m-{method}-")
    train = json.loads((run / "train.json").read_text())
    assert train["method"] == method and train["steps"] == 3
    assert all(r["loss"] == r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r)  # no NaN
    if method == "reward":
        assert not (run / "gguf").exists() and train["preference"]["trained"]["pairs"] == 8
    else:
        smoke = json.loads((run / "smoke.json").read_text())
        assert [r["passed"] for r in smoke["results"]] == [True], smoke["results"]
