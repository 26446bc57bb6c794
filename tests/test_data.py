"""Preference data in every accepted format becomes exactly the rows TRL receives; bad rows are counted."""
import json

import pytest

from app import ROOT
from app.cli import main
from app.data import load_preference_data, normalize_rows, read_rows
from app.recipe import DataSection

DATA = ROOT / "tests" / "data"


def msg(role, content):
    return {"role": role, "content": content}


def rows_of(name, columns=None):
    return normalize_rows(read_rows(str(DATA / name)), columns)


def test_standard_rows_become_one_turn_conversations_and_bad_rows_are_counted():
    rows, formats, dropped = rows_of("standard.jsonl")
    assert formats == {"standard"}
    assert rows == [
        {"prompt": [msg("user", "What is 2+2?")], "chosen": [msg("assistant", "2+2 is 4.")],
         "rejected": [msg("assistant", "2+2 is 5.")]},
        {"prompt": [msg("user", "Café?")], "chosen": [msg("assistant", "Un café, s'il vous plaît ☕")],
         "rejected": [msg("assistant", "Non.")]}]
    assert dropped == {"chosen equals rejected": 1, "empty chosen": 1, "duplicate": 1, "non-string chosen": 1}


def test_conversational_rows_keep_their_history_and_split_by_message_not_by_characters():
    rows, formats, dropped = rows_of("conversational.jsonl")
    assert formats == {"conversational"}
    assert rows[0]["prompt"] == [msg("system", "Be brief."), msg("user", "Capital of France?")]
    # both replies begin with "Sure, ": a character-level common prefix would cut into them
    assert rows[1] == {"prompt": [msg("user", "Name a fruit."), msg("assistant", "Apple."), msg("user", "Another?")],
                       "chosen": [msg("assistant", "Sure, a pear is a fine fruit.")],
                       "rejected": [msg("assistant", "Sure, no.")]}
    assert dropped == {"empty rejected": 1}  # an empty assistant turn


def test_anthropic_hh_splits_at_the_last_assistant_turn_and_drops_mismatched_prompts():
    rows, formats, dropped = rows_of("hh.jsonl")
    assert formats == {"hh"}
    assert rows[0] == {"prompt": [msg("user", "What is the capital of France?")],
                       "chosen": [msg("assistant", "The capital of France is Paris.")],
                       "rejected": [msg("assistant", "The capital of France is Lyon.")]}
    assert rows[1]["prompt"] == [msg("user", "Hi"), msg("assistant", "Hello! How can I help?"),
                                 msg("user", "Tell me a joke.")]
    assert rows[1]["chosen"] == [msg("assistant", "Why did the chicken cross the road? To get to the other side.")]
    assert rows[1]["rejected"] == [msg("assistant", "Why? No.")]
    assert dropped == {"hh prompts differ": 1}


def test_other_column_names_are_mapped_by_the_recipe():
    rows, formats, _ = rows_of("mapped.csv", {"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert formats == {"standard"} and len(rows) == 2
    assert rows[0]["chosen"] == [msg("assistant", "Yes, water makes things wet.")]


def test_a_dataset_folder_loads_through_the_hub_code_path(tmp_path):
    import datasets
    datasets.Dataset.from_list([{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                for i in range(50)]).save_to_disk(str(tmp_path / "saved"))
    folder = tmp_path / "hub-like"
    datasets.load_from_disk(str(tmp_path / "saved")).to_parquet(str(folder / "train.parquet"))
    data = load_preference_data(DataSection(source=str(folder), split="train", eval_share=0.2, seed=1))
    again = load_preference_data(DataSection(source=str(folder), split="train", eval_share=0.2, seed=1))
    assert (len(data.train), len(data.eval)) == (40, 10) and data.eval["prompt"] == again.eval["prompt"]
    assert not {m[0]["content"] for m in data.train["prompt"]} & {m[0]["content"] for m in data.eval["prompt"]}


def test_data_inspect_reports_format_counts_and_dumps_the_normalized_rows(tmp_path, capsys):
    dump = tmp_path / "rows.jsonl"
    assert main(["data", "inspect", str(DATA / "hh.jsonl"), "--json", "--dump", str(dump)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "hh" and report["rows_read"] == 3 and report["rows_kept"] == 2
    assert report["dropped"] == {"hh prompts differ": 1}
    dumped = [json.loads(line) for line in dump.read_text().splitlines()]
    assert dumped[0]["chosen"] == [msg("assistant", "The capital of France is Paris.")]


def test_data_inspect_renders_examples_through_the_recipes_chat_template(capsys):
    assert main(["data", "inspect", str(DATA / "standard.jsonl"), "--recipe", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "format: standard" in out and "kept 2 of 6" in out and "chosen equals rejected" in out
    assert "<|user|>\nWhat is 2+2?\n<|assistant|>\n2+2 is 4.</s>" in out


@pytest.mark.parametrize("name", ["standard.jsonl", "conversational.jsonl", "hh.jsonl"])
def test_every_fixture_keeps_rows(name):
    rows, _, _ = rows_of(name)
    assert rows


def test_a_named_eval_split_is_the_held_out_set(tmp_path):
    import datasets
    folder = tmp_path / "hub-like"
    for split, n in (("train", 30), ("test", 5)):
        datasets.Dataset.from_list([{"prompt": f"{split} q{i}", "chosen": "good", "rejected": "bad"} for i in range(n)]
                                   ).to_parquet(str(folder / f"{split}.parquet"))
    data = load_preference_data(DataSection(source=str(folder), split="train", eval_split="test"))
    assert (len(data.train), len(data.eval)) == (30, 5)
    assert all(m[0]["content"].startswith("test") for m in data.eval["prompt"])
