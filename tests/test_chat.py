"""Chat on the tiny run's GGUF: commands, the system prompt, history kept within the context, scripted use."""
import io
import shutil
import subprocess
import sys

import pytest
import yaml

from app import ROOT
from app.cli import main

PROMPTS = ["What is the sun?", "Tell me about bees.", "Can you explain rain?", "How do I make bread?",
           "What is a cat?", "Why is the sky blue?"]


def run_chat(run, lines, *options):
    """The CLI with piped stdin (scripted mode): (stdout reply blocks, stderr, exit status)."""
    proc = subprocess.run([sys.executable, "-m", "app", "chat", str(run), "--quant", "f16", "--temperature", "0",
                           *options], input="".join(f"{line}\n" for line in lines), capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    return proc.stdout.split("\n\n")[:-1], proc.stderr, proc.returncode  # each block ends with a blank line


@pytest.fixture
def sent(monkeypatch):
    """The message lists chat() hands to llama.cpp, one per reply (the real model still answers)."""
    import llama_cpp

    calls = []

    class Recording(llama_cpp.Llama):
        def create_chat_completion(self, messages, **kwargs):
            calls.append([dict(m) for m in messages])
            return super().create_chat_completion(messages=messages, **kwargs)

    monkeypatch.setattr(llama_cpp, "Llama", Recording)
    return calls


def user(text):
    return {"role": "user", "content": text}


def chat_in_process(monkeypatch, lines, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    return main(["chat", *map(str, args), "--temperature", "0", "--max-tokens", "24"])


def test_scripted_chat_answers_each_prompt_and_obeys_reset_system_and_quit(tiny_run):
    blocks, err, code = run_chat(tiny_run, [PROMPTS[0], PROMPTS[1], "/reset", "/system You answer briefly.",
                                            PROMPTS[2], "/quit", "never read"], "--max-tokens", "48")
    assert code == 0, err
    assert len(blocks) == 3 and all(b.strip() for b in blocks), blocks


def test_history_reset_and_system_prompt_reach_the_model(tiny_run, monkeypatch, sent):
    assert chat_in_process(monkeypatch, [PROMPTS[0], PROMPTS[1], "/reset", PROMPTS[2], "/system Be kind.",
                                         PROMPTS[3], PROMPTS[4], "/system", PROMPTS[5]], tiny_run) == 0
    first_reply = sent[1][1]
    assert sent[0] == [user(PROMPTS[0])]
    assert sent[1] == [user(PROMPTS[0]), first_reply, user(PROMPTS[1])] and first_reply["role"] == "assistant"
    assert sent[2] == [user(PROMPTS[2])]  # /reset
    assert sent[3] == [{"role": "system", "content": "Be kind."}, user(PROMPTS[3])]  # /system clears history
    assert sent[4][0] == {"role": "system", "content": "Be kind."} and len(sent[4]) == 4
    assert sent[5] == [user(PROMPTS[5])]  # /system without text: none


def test_system_prompt_comes_from_the_recipe_unless_given(tiny_run, tmp_path, monkeypatch, sent):
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run / "gguf", run / "gguf")
    recipe = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    recipe["export"]["system"] = "You are a tiny model."
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert chat_in_process(monkeypatch, [PROMPTS[0]], run) == 0
    assert chat_in_process(monkeypatch, [PROMPTS[0]], run, "--system", "Be kind.") == 0
    assert chat_in_process(monkeypatch, [PROMPTS[0]], run, "--system", "") == 0
    assert [call[0]["content"] for call in sent] == ["You are a tiny model.", "Be kind.", PROMPTS[0]]


def test_history_is_trimmed_to_the_context_and_replies_still_come(tiny_run):
    blocks, err, code = run_chat(tiny_run, PROMPTS, "--ctx", "128", "--max-tokens", "32")
    assert code == 0, err
    assert len(blocks) == len(PROMPTS) and all(b.strip() for b in blocks), blocks
    notices = [line for line in err.splitlines() if line.startswith("note: dropped the oldest")]
    assert notices and all("context of 128 tokens" in n for n in notices), err


def test_trimming_keeps_the_system_prompt_and_the_newest_turns(tiny_run, monkeypatch, sent, capsys):
    assert chat_in_process(monkeypatch, ["/system Be kind.", *PROMPTS], tiny_run, "--ctx", "128") == 0
    assert "note: dropped the oldest" in capsys.readouterr().err
    assert all(call[0] == {"role": "system", "content": "Be kind."} for call in sent)
    assert all(call[-1] == user(p) for call, p in zip(sent, PROMPTS))
    assert len(sent[-1]) < 2 * len(PROMPTS)  # older turns left


def test_a_message_longer_than_the_context_keeps_its_end_and_is_answered(tiny_run):
    """20,000 characters pasted into a 256-token context: its most recent part is kept, said on stderr."""
    long = "".join(f"word{i} " for i in range(2500))[:20_000] + "What is the sun?"
    blocks, err, code = run_chat(tiny_run, [long, "What is a cat?"], "--ctx", "256", "--max-tokens", "32")
    assert code == 0, err
    assert len(blocks) == 2 and all(b.strip() for b in blocks), blocks
    note = next(line for line in err.splitlines() if line.startswith("note: the message is longer"))
    kept = int(note.split("kept its last ")[1].split(" of ")[0].replace(",", ""))
    assert 0 < kept < 2000 and "of 20,016 characters" in note, note
    assert "Traceback" not in err


def test_keep_the_end_finds_the_longest_ending_that_fits():
    """With a count of one token per character (plus 3 for the template) the bisection's answer is exact."""
    from app.chat import fit_history

    def count(messages):
        return 3 + sum(len(m["content"]) for m in messages)

    turns = fit_history(count, None, [user("x" * 1000 + "the end")], max_tokens=10, n_ctx=100)
    assert turns == [user(("x" * 1000 + "the end")[-87:])]
    assert fit_history(count, None, [user("short")], max_tokens=10, n_ctx=100) == [user("short")]


def test_chat_stops_with_one_sentence_on_what_it_cannot_do(tiny_run, monkeypatch, capsys):
    assert chat_in_process(monkeypatch, ["hello"], tiny_run, "--ctx", "128", "--system", "word " * 200) == 2
    assert "not even an empty message fits the context of 128" in capsys.readouterr().err
    assert chat_in_process(monkeypatch, ["/unknown"], tiny_run) == 2
    assert "unknown command /unknown" in capsys.readouterr().err
    assert main(["chat", str(tiny_run), "--ctx", "64", "--max-tokens", "64"]) == 2
    assert "--max-tokens 64 must be positive and leave room" in capsys.readouterr().err
