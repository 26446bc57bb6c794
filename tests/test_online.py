"""Online methods (grpo, rloo): the model samples replies to the prompts, a reward scores them, and the
model learns to score higher; the export and llama.cpp's smoke test are the same as every method's."""
import json
import re
from pathlib import Path

import pytest

from app.cli import main
from tests.conftest import read_jsonl, run_folders


def rising(run: Path) -> dict:
    trend = json.loads((run / "train.json").read_text())["reward_trend"]
    assert trend["last"] > trend["first"] + 1.0, trend  # measured +3.0 to +5.0 nats of reward (see below)
    return trend


@pytest.mark.slow
def test_grpo_against_a_reward_run_raises_the_mean_reward_and_its_gguf_passes_smoke(reward_run, new_runs, capsys):
    # measured on tiny, the 20-step reward run: the mean reward of the sampled replies went from about -0.4
    # (steps 5-15) to about +4.5 (steps 50-60), and the greedy probe replies from rude to polite
    assert main(["grpo", "tiny", "--set", f"rewards.run={reward_run}", "--set", "export.gguf=[f16]"]) == 0
    new_runs("tiny-grpo-")
    (run,) = run_folders(capsys.readouterr().out)
    rising(run)
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in logged] == list(range(5, 61, 5))  # the mean reward at every logged step
    assert all(r["completions/mean_length"] <= 64 for r in logged)  # the recipe's max_completion_length
    report = (run / "report.md").read_text()
    assert "## Mean reward of the sampled replies" in report and "(rising)" in report
    assert (run / "plots" / "reward.png").stat().st_size > 10_000
    train = json.loads((run / "train.json").read_text())
    assert not [a for a in train["alarms"] if a["name"] == "reward flat"]
    assert [r["passed"] for r in json.loads((run / "smoke.json").read_text())["results"]] == [True]


@pytest.mark.slow
def test_rloo_adds_the_reward_functions_of_a_file_and_says_it_runs_their_code(reward_run, new_runs, capsys, caplog):
    assert main(["rloo", "tiny", "--set", f"rewards.run={reward_run}", "--set", "export.gguf=[f16]",
                 "--set", "rewards.functions=recipes/rewards/courtesy.py"]) == 0
    new_runs("tiny-rloo-")
    (run,) = run_folders(capsys.readouterr().out)
    assert "runs the Python code in" in caplog.text and "courtesy.py" in caplog.text
    rising(run)
    last = [r for r in read_jsonl(run / "metrics.jsonl") if "reward" in r][-1]
    # TRL logs each reward's mean: the reward model's and each function's, and their sum as `reward`
    assert {"rewards/courtesy/mean", "rewards/brevity/mean"} <= set(last)
    assert last["rewards/courtesy/mean"] > 0  # polite phrases outnumber dismissive ones by the end
    assert [r["passed"] for r in json.loads((run / "smoke.json").read_text())["results"]] == [True]


@pytest.mark.slow
def test_the_rlhf_chain_scores_grpo_with_its_own_reward_stage_and_starts_from_the_sft_model(new_runs, capsys):
    assert main(["train", "tiny-rlhf", "--set", "sft.max_steps=10", "--set", "reward.max_steps=10",
                 "--set", "grpo.max_steps=10", "--set", "export.gguf=[f16]"]) == 0
    for prefix in ("tiny-rlhf-sft-", "tiny-rlhf-reward-", "tiny-rlhf-grpo-"):
        new_runs(prefix)
    sft, reward, grpo = run_folders(capsys.readouterr().out)
    recipe = (grpo / "recipe.yaml").read_text()
    assert f"run: {reward}" in recipe  # the reward stage's model scores the policy's samples
    assert f"name: {sft / 'merged'}" in recipe  # the policy is the SFT model, not the reward model
    assert f"name: {sft / 'merged'}" in (reward / "recipe.yaml").read_text()  # the reward model starts from it too
    assert [r["passed"] for r in json.loads((grpo / "smoke.json").read_text())["results"]] == [True]


def test_a_run_that_is_not_a_reward_run_is_refused_before_anything_loads(tiny_run, capsys):
    assert main(["grpo", "tiny", "--set", f"rewards.run={tiny_run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tiny_run.name} is not a finished reward run (train one with: make reward)"]


@pytest.mark.parametrize("code, message", [
    ("import os\n", "defines no reward function"),
    ("def f(completions, **kw):\n    return [\n", "line 2: not valid Python"),
    ("raise RuntimeError('boom')\n", "running it failed with RuntimeError: boom"),
])
def test_a_reward_functions_file_that_cannot_serve_is_one_sentence(code, message, tmp_path):
    from app import AppError
    from app.rewards import load_reward_functions
    path = tmp_path / "rewards.py"
    path.write_text(code)
    with pytest.raises(AppError, match=re.escape(message)):
        load_reward_functions(path)


def test_an_online_recipe_without_a_reward_is_told_where_one_comes_from(tmp_path, capsys):
    recipe = tmp_path / "online.yaml"
    recipe.write_text("base: tiny\nstages: [grpo]\n")
    assert main(["train", str(recipe)]) == 2
    assert "grpo learns from a reward, and this recipe names none" in capsys.readouterr().err
