"""`python -m app pairs`: preference pairs from AI feedback on the tiny prompts, in both modes, from the tiny DPO
run's GGUF (llama.cpp) and from the tiny recipe's model (transformers); the output loads through app.data and
`dpo` trains on it; a stopped run keeps its lines and a rerun finishes without redoing them.

The tiny model writes poor text, so these tests check the mechanics: how many pairs, the reward model's scores
ordered chosen above rejected, the provenance of every row, determinism, and the file going into `dpo`."""
import contextlib
import io
import json

import pytest

from app.cli import main
from app.pairs import read_constitution
from tests.conftest import read_jsonl

PROMPTS = "recipes/data/tiny_prefs.jsonl"  # 300 distinct prompts; the first LIMIT are used
LIMIT = 30


def pairs(out, mode: str, *flags) -> tuple[int, str]:
    """`python -m app pairs` in-process on the first LIMIT tiny prompts: (exit code, stdout)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["pairs", "--prompts", PROMPTS, "--mode", mode, "--out", str(out), "--limit", str(LIMIT), *flags])
    return code, printed.getvalue()


def counts(stdout: str) -> dict:
    """The numbers of the summary lines: prompts, already done, pairs written, dropped."""
    lines = {line.split(":")[0]: line.split(":", 1)[1].split() for line in stdout.splitlines() if ":" in line}
    return {"prompts": int(lines["prompts"][0]), "skipped": int(lines["prompts"][1].strip("(")),
            "pairs": int(lines["pairs written"][0]), "dropped": int(lines["dropped"][0])}


@pytest.fixture(scope="module")
def reward_pairs(tiny_run, reward_run, tmp_path_factory):
    """(rows, summary counts) of reward mode: 4 samples a prompt from the DPO run's GGUF, scored by the reward run."""
    out = tmp_path_factory.mktemp("pairs") / "reward.jsonl"
    code, stdout = pairs(out, "reward", "--model", str(tiny_run), "--reward-run", str(reward_run))
    assert code == 0
    return read_jsonl(out), counts(stdout)


@pytest.fixture(scope="module")
def constitution_pairs(tiny_run, tmp_path_factory):
    """(rows, summary counts) of constitution mode with the default constitution, from the DPO run's GGUF."""
    out = tmp_path_factory.mktemp("pairs") / "constitution.jsonl"
    code, stdout = pairs(out, "constitution", "--model", str(tiny_run))
    assert code == 0
    return read_jsonl(out), counts(stdout)


def test_reward_mode_keeps_the_best_and_worst_reply_with_the_gap_and_counts_the_dropped(reward_pairs, reward_run):
    rows, summary = reward_pairs
    assert summary["prompts"] == LIMIT and summary["skipped"] == 0
    assert len(rows) == summary["pairs"] >= 20
    assert summary["pairs"] + summary["dropped"] == LIMIT  # every prompt is a pair or a counted drop
    for row in rows:
        p = row["provenance"]
        assert p["mode"] == "reward" and p["reward_run"] == reward_run.name and "tiny-q4_k_m.gguf" in p["model"]
        assert p["chosen_score"] == max(p["scores"]) and p["rejected_score"] == min(p["scores"])
        assert p["chosen_score"] - p["rejected_score"] >= 0.5  # --min-gap's default
        assert row["chosen"] != row["rejected"]


def test_constitution_mode_pairs_the_revision_over_the_first_answer(constitution_pairs):
    rows, summary = constitution_pairs
    assert len(rows) == summary["pairs"] >= 20 and summary["pairs"] + summary["dropped"] == LIMIT
    names = {p["name"] for p in read_constitution("recipes/data/constitution.yaml")}
    assert 4 <= len(names) <= 6
    for row in rows:
        p = row["provenance"]
        assert p["mode"] == "constitution" and p["principle"] in names and p["critique"]
        assert row["chosen"] and row["rejected"] and row["chosen"] != row["rejected"]
    assert len({row["provenance"]["principle"] for row in rows}) >= 3  # drawn per prompt, not one for all


def test_both_outputs_load_through_app_data_and_dpo_trains_on_them(reward_pairs, constitution_pairs, tmp_path,
                                                                   new_runs):
    from app.data import inspect_data, load_preference_data
    from app.recipe import DataSection

    both = tmp_path / "both.jsonl"
    rows = reward_pairs[0] + constitution_pairs[0]
    both.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report, _ = inspect_data(DataSection(source=str(both)))
    assert report["rows_kept"] == len(rows) and report["dropped"] == {}  # the provenance column is no obstacle
    loaded = load_preference_data(DataSection(source=str(both), eval_share=0.1))
    assert len(loaded.train) + len(loaded.eval) == len(rows)
    recipe = tmp_path / "pairs-dpo.yaml"  # a name of its own, so that no other process's tiny run is taken for it
    recipe.write_text("base: tiny\nname: pairs-dpo\n")
    assert main(["dpo", str(recipe), "--set", f"data.source={both}", "--set", "dpo.max_steps=5",
                 "--set", "export.gguf=[f16]"]) == 0
    (run,) = new_runs("pairs-dpo-dpo-")
    train = json.loads((run / "train.json").read_text())
    assert train["method"] == "dpo" and train["steps"] == 5
    assert [r["passed"] for r in json.loads((run / "smoke.json").read_text())["results"]] == [True]


def test_a_stopped_run_keeps_its_lines_and_a_rerun_finishes_without_redoing_them(constitution_pairs, tiny_run,
                                                                                   tmp_path, monkeypatch):
    import app.pairs

    done, stop_after = [], 12
    real = app.pairs.constitution_pair

    def counted(*args, **kwargs):
        if len(done) == stop_after and stop:
            raise KeyboardInterrupt  # Ctrl-C while the 13th prompt is being written
        done.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(app.pairs, "constitution_pair", counted)
    out = tmp_path / "pairs.jsonl"
    partial = tmp_path / "pairs.jsonl.partial"
    stop = True
    assert pairs(out, "constitution", "--model", str(tiny_run))[0] == 130
    assert not out.exists()  # nothing half-written looks complete
    assert len(read_jsonl(partial)) == 1 + stop_after  # the settings line, then one line a prompt
    partial.write_text(partial.read_text() + '{"prompt": "Please describe the')  # a kill in mid-write: a torn line

    done.clear()
    stop = False
    code, stdout = pairs(out, "constitution", "--model", str(tiny_run))
    assert code == 0 and not partial.exists()
    assert counts(stdout)["skipped"] == stop_after and len(done) == LIMIT - stop_after  # none done twice
    assert read_jsonl(out) == constitution_pairs[0]  # seeded per prompt: the same pairs as one uninterrupted run


def test_a_partial_file_of_other_settings_is_not_continued(tiny_run, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    (tmp_path / "pairs.jsonl.partial").write_text(json.dumps({"pairs_settings": {"seed": 7}}) + "\n")
    assert pairs(out, "constitution", "--model", str(tiny_run))[0] == 2
    assert "pairs.jsonl.partial was begun with other settings" in capsys.readouterr().err


def test_the_recipe_model_through_transformers_samples_the_same_pairs_for_the_same_seed(reward_run, tmp_path):
    made = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / f"{name}.jsonl"
        code, _ = pairs(out, "reward", "--model", "tiny", "--reward-run", str(reward_run), "--limit", "4",
                        "--seed", seed, "--min-gap", "0")
        assert code == 0
        made.append(read_jsonl(out))
    assert made[0] == made[1] and made[0] != made[2]
    assert all("(transformers)" in row["provenance"]["model"] for row in made[0])
