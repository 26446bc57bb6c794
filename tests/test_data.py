"""Preference rows in the formats users bring become TRL's conversational format, row by row."""
import pytest

from app import AppError
from app.data import load_preference_data, to_conversational


def msg(role, content):
    return {"role": role, "content": content}


def test_strings_become_one_turn_conversations():
    row = to_conversational({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go."}, "r")
    assert row == {"prompt": [msg("user", "Hi?")], "chosen": [msg("assistant", "Hello!")],
                   "rejected": [msg("assistant", "Go.")]}


def test_conversations_without_prompt_split_at_the_last_shared_message_not_inside_a_reply():
    # both replies begin with the same words: a character-level common prefix would cut into them
    history = [msg("user", "Name a fruit."), msg("assistant", "Apple."), msg("user", "Another?")]
    row = to_conversational({"chosen": history + [msg("assistant", "Sure, a pear is a fine fruit.")],
                             "rejected": history + [msg("assistant", "Sure, no.")]}, "r")
    assert row["prompt"] == history
    assert row["chosen"] == [msg("assistant", "Sure, a pear is a fine fruit.")]
    assert row["rejected"] == [msg("assistant", "Sure, no.")]


def test_conversations_sharing_nothing_name_the_row():
    with pytest.raises(AppError, match="row 7: 'chosen' and 'rejected' share no prompt"):
        to_conversational({"chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]}, "row 7")


def test_eval_split_is_held_out_and_deterministic(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"prompt": "q{i}", "chosen": "good {i}", "rejected": "bad {i}"}}\n'
                            for i in range(50)))
    a = load_preference_data({"source": str(path), "eval_share": 0.2, "seed": 1})
    b = load_preference_data({"source": str(path), "eval_share": 0.2, "seed": 1})
    assert (len(a.train), len(a.eval)) == (40, 10) and a.eval["prompt"] == b.eval["prompt"]
    assert not {m[0]["content"] for m in a.train["prompt"]} & {m[0]["content"] for m in a.eval["prompt"]}
