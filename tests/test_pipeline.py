"""The whole pipeline on the tiny recipe: DPO trains, the export is complete, llama.cpp proves every GGUF."""
import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file  # the adapter is bfloat16, which numpy has no type for

from app import ROOT
from app.runs import sha256
from tests.conftest import TINY_STEPS, read_jsonl


def test_dpo_loss_falls_and_heldout_accuracy_is_well_above_chance(tiny_run):
    logs = read_jsonl(tiny_run / "metrics.jsonl")
    train = [r for r in logs if "loss" in r]
    assert train[0]["step"] <= 5 and train[-1]["step"] == TINY_STEPS
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-2:]) / 2
    assert first > 0.6 and last < first - 0.04, (first, last)  # DPO starts at log(2) = 0.693; measured -0.10
    evals = [r["eval_loss"] for r in logs if "eval_loss" in r]
    assert evals[0] > 0.69 and evals[-1] < evals[0] - 0.04, evals  # the same held-out pairs: measured -0.09
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "tokens_per_second"):
        assert key in train[-1]
    summary = json.loads((tiny_run / "train.json").read_text())
    assert summary["eval"]["eval_rewards/accuracies"] >= 0.8
    assert summary["eval"]["eval_rewards/margins"] > 0
    assert [r["step"] for r in train] == sorted({r["step"] for r in train})  # each logged step once


def test_the_tiny_run_trips_no_alarm(tiny_run):
    """A run that worked says so: train.json's alarms are empty and the report says none tripped (each alarm
    is tripped by data made for it in test_alarms.py)."""
    assert json.loads((tiny_run / "train.json").read_text())["alarms"] == []
    assert "**Alarms: none**" in (tiny_run / "report.md").read_text()


def test_after_dpo_the_replies_keep_to_the_prompts_topic(tiny_run):
    """DPO changes the manner, not the content: each probe's reply names the probe's topic (its last word,
    singular) in most probes, after as before. Greedy replies vary with the machine's arithmetic; the
    tiny model answers every probe on topic on the machines measured (see README)."""
    replies = json.loads((tiny_run / "train.json").read_text())["replies"]
    on_topic = [r["prompt"].rstrip("?.").split()[-1].lower().rstrip("s") in r["after"].lower() for r in replies]
    assert len(replies) >= 3 and sum(on_topic) > len(replies) / 2, replies


def test_adapter_weights_changed(tiny_run):
    weights = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(lora_b) == 4 * 7  # 4 layers x 7 projections
    assert all(abs(w).max() > 1e-4 for w in lora_b)  # LoRA B starts at zero: every one moved


def test_run_folder_is_complete_and_manifest_is_true(tiny_run):
    for name in ("recipe.yaml", "metrics.jsonl", "train.json", "smoke.json", "manifest.json",
                 "adapter/adapter_config.json", "merged/config.json", "merged/tokenizer.model",
                 "gguf/tiny-f16.gguf", "gguf/tiny-q8_0.gguf", "gguf/tiny-q4_k_m.gguf", "gguf/Modelfile",
                 "preference_eval.json", "report.md", "plots/loss.png", "merged/README.md", "gguf/README.md"):
        assert (tiny_run / name).is_file(), name
    modelfile = (tiny_run / "gguf" / "Modelfile").read_text()
    assert "FROM ./tiny-q4_k_m.gguf" in modelfile and "TEMPLATE" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    for name in ("smoke.json", "report.md", "gguf/Modelfile", "gguf/tiny-q4_k_m.gguf", "merged/README.md",
                 "gguf/README.md"):
        assert name in manifest["files"], name
    for rel, entry in manifest["files"].items():
        assert (tiny_run / rel).stat().st_size == entry["bytes"], rel
    assert sha256(tiny_run / "gguf/tiny-f16.gguf") == manifest["files"]["gguf/tiny-f16.gguf"]["sha256"]
    # that exports/latest moved to it is checked by the tiny_run fixture, before other tests make runs
    assert not list(tiny_run.rglob("*.tmp"))


def test_every_gguf_passes_smoke_and_f16_agrees_on_every_token(tiny_run):
    smoke = json.loads((tiny_run / "smoke.json").read_text())
    assert smoke["passed"]
    by_type = {r["type"]: r for r in smoke["results"]}
    assert set(by_type) == {"f16", "q8_0", "q4_k_m"}
    f16 = by_type["f16"]
    # against the merged model computed in float32, in a process of its own that never imported Unsloth
    # (this one did): agreement wherever the reference is decisive, an error of f16 rounding size (measured
    # 0.014-0.016 of a logit range of 20; 0.09 against a bfloat16 reference)
    assert smoke["reference"]["dtype"] == "float32" and smoke["reference"]["device"] == "cpu"
    assert smoke["reference"]["unsloth_imported"] is False
    assert f16["decisive_top1"] == 1.0 and f16["top1_agreement"] > 0.9
    assert f16["max_abs_logit_diff"] < 0.005 * f16["logit_scale"]
    assert f16["metadata"] == {"architecture": "llama", "eos_token_id": 2, "has_chat_template": True}
    for probe in f16["probes"]:  # the trained tiny model ends its replies with EOS, and so does the GGUF chat
        assert probe["hf_reply_tokens"] < 48 and probe["chat_finish_reason"] == "stop"
        if probe["matching_lead"] < probe["hf_reply_tokens"]:  # only at a near-tie
            assert probe["gap_at_divergence"] <= 2 * f16["max_abs_logit_diff"], probe
    assert by_type["q8_0"]["top1_agreement"] >= 0.95


def test_chat_answers_a_piped_prompt_and_stops(tiny_run):
    proc = subprocess.run([sys.executable, "-m", "app", "chat", str(tiny_run), "--quant", "f16",
                           "--temperature", "0", "--max-tokens", "200"],
                          input="What is the sun?\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reply = proc.stdout.strip()
    assert len(reply.split()) >= 3, reply


def test_verify_names_a_damaged_file_and_chat_refuses_it(tiny_run, tmp_path, capsys):
    import shutil

    from app.cli import main

    assert main(["verify", str(tiny_run)]) == 0
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("merged", "adapter", "checkpoints"))
    gguf = copy / "gguf" / "tiny-q4_k_m.gguf"
    gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])  # an interrupted copy
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 2
    assert "gguf/tiny-q4_k_m.gguf: " in capsys.readouterr().err
    assert main(["chat", str(gguf)]) == 2
    assert "but its run's manifest says" in capsys.readouterr().err
    (tmp_path / "fake.gguf").write_text("not a model")
    assert main(["chat", str(tmp_path / "fake.gguf")]) == 2
    assert "fake.gguf is not a GGUF file" in capsys.readouterr().err


def test_export_from_the_run_folder_alone_recreates_every_gguf(tiny_run_copy):
    """`python -m app export RUN` after the exports are gone: it reloads base + adapter through Unsloth."""
    import shutil

    from app.cli import main

    run = tiny_run_copy
    shutil.rmtree(run / "gguf")
    shutil.rmtree(run / "merged")
    (run / "smoke.json").unlink()
    assert main(["export", str(run)]) == 0
    assert sorted(p.name for p in (run / "gguf").iterdir()) == [
        "Modelfile", "README.md", "tiny-f16.gguf", "tiny-q4_k_m.gguf", "tiny-q8_0.gguf"]
    assert json.loads((run / "smoke.json").read_text())["passed"]
    assert set(json.loads((run / "manifest.json").read_text())["files"]) >= {"gguf/tiny-q8_0.gguf", "smoke.json"}


def test_a_file_llama_cpp_cannot_load_is_one_failed_row_and_the_others_are_still_checked(tiny_run, tmp_path):
    """A GGUF cut short inside (its header intact) between two good ones: smoke names it, in words that say
    the file is damaged, and still judges the others."""
    import shutil

    from app.smoke import check_ggufs

    good = sorted((tiny_run / "gguf").glob("*.gguf"))
    files = [shutil.copy(p, tmp_path / p.name) for p in good]
    damaged = tmp_path / "damaged-q8_0.gguf"
    data = (tiny_run / "gguf" / "tiny-q8_0.gguf").read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    results = check_ggufs(tiny_run / "merged", [Path(files[0]), damaged, Path(files[1])], ["What is the sun?"],
                          log=lambda *a: None)
    assert [r["passed"] for r in results] == [True, False, True], results
    assert "could not load damaged-q8_0.gguf" in results[1]["reason"] and "damaged or incomplete" in results[1]["reason"]
