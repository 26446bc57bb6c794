"""Model cards (app/card.py) and `push` (app/push.py).

The cards are read back with huggingface_hub's own parser (ModelCard), and with llama.cpp's (gguf-py), which
reads a model folder's README.md when it converts one. Most tests build a run folder by hand, with the
shapes the real files have (app/train.py's train.json, app/smoke.py's smoke.json), so they need no
training; one checks the cards of the real tiny run. push is tested where it needs no network: the dry run
(what would go, with sizes) and the errors a user can cause, each one line on stderr and exit code 2.
"""
import json
from pathlib import Path

import pytest

from app.cli import main

HUB_BASE, HUB_DATA = "unsloth/Llama-3.2-1B-Instruct", "trl-lib/ultrafeedback_binarized"
PREFERENCE = {"base": {"pairs": 30, "accuracy": 0.4667, "margin": -0.8123, "logp_chosen": -61.2,
                       "logp_rejected": -60.4},
              "trained": {"pairs": 30, "accuracy": 0.9, "margin": 12.3456, "logp_chosen": -40.1, "logp_rejected": -52.4,
                          "reward_accuracy": 0.9667, "reward_margin": 2.31}, "left_out_too_long": 0}
MIB = 2**20


def smoke_result(file: str, kind: str, size: int, passed: bool = True, reason: str = "") -> dict:
    """One entry of smoke.json's results, as app/smoke.py's check_gguf writes it."""
    return {"file": file, "type": kind, "bytes": size,
            "metadata": {"architecture": "llama", "eos_token_id": 2, "has_chat_template": True},
            "tokenizer_eos_id": 2, "prompt_mismatch": None, "probes": [], "max_abs_logit_diff": 0.031,
            "mean_abs_logit_diff": 0.002, "logit_scale": 21.4, "top1_agreement": 0.985, "greedy_lead_share": 1.0,
            "decisive_top1": 1.0, "reference_dtype": "float32",
            "preference": {"pairs": 30, "accuracy": 0.9, "reward_accuracy": 0.9667},
            "seconds": 1.2, "passed": passed, "reason": reason,
            "thresholds": {"max_abs_logit_diff": 0.428, "top1_agreement": 1.0}}


def make_run(folder: Path, method: str = "dpo", overrides=()) -> Path:
    """A finished run folder as the pipeline leaves it, with placeholder weights (their sizes matter here,
    not their bytes), plus what push must leave behind: adapter/, checkpoints/ and a temporary file."""
    from app.recipe import load_recipe, save_recipe
    from app.runs import write_manifest
    from app.tiny import CHAT_TEMPLATE

    run = folder / f"tiny-{method}-20260101-120000"
    for sub in ("merged", "gguf", "adapter", "checkpoints/checkpoint-20"):
        (run / sub).mkdir(parents=True)
    save_recipe(load_recipe("tiny", list(overrides)), run / "recipe.yaml")
    (run / "train.json").write_text(json.dumps({
        "alarms": [], "method": method, "steps": 60, "train_seconds": 41.5, "train_loss": 0.41,
        "eval": {"eval_loss": 0.35, "eval_rewards/accuracies": 0.93}, "preference": PREFERENCE,
        "peak_memory_gb": 0.0, "replies": [],
        "data": {"source": "recipes/data/tiny_prefs.jsonl", "format": "standard", "rows": 300, "dropped": {},
                 "train": 270, "eval": 30}}))
    if method == "reward":  # a scorer: no merged weights, no GGUF
        for sub in ("merged", "gguf"):
            (run / sub).rmdir()
        return run
    (run / "smoke.json").write_text(json.dumps({"passed": True, "results": [
        smoke_result("tiny-f16.gguf", "f16", 5 * MIB), smoke_result("tiny-q4_k_m.gguf", "q4_k_m", 2 * MIB)]}))
    (run / "merged" / "model.safetensors").write_bytes(b"\0" * (3 * MIB))
    (run / "merged" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (run / "merged" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (run / "gguf" / "tiny-f16.gguf").write_bytes(b"GGUF" + b"\0" * (5 * MIB - 4))
    (run / "gguf" / "tiny-q4_k_m.gguf").write_bytes(b"GGUF" + b"\0" * (2 * MIB - 4))
    (run / "gguf" / ".tiny-q8_0.gguf.tmp").write_bytes(b"GGUF")  # an export cut short
    (run / "gguf" / "Modelfile").write_text("FROM ./tiny-q4_k_m.gguf\n")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    (run / "checkpoints" / "checkpoint-20" / "optimizer.pt").write_bytes(b"\0" * 1024)
    write_manifest(run)
    return run


def test_cards_metadata_reads_back_with_huggingface_hubs_parser(tmp_path):
    from huggingface_hub import ModelCard

    from app.card import write_model_card

    run = make_run(tmp_path, overrides=[f"model.name={HUB_BASE}", f"data.source={HUB_DATA}"])
    assert write_model_card(run) == [run / "merged" / "README.md", run / "gguf" / "README.md"]
    merged, gguf = (ModelCard.load(run / kind / "README.md") for kind in ("merged", "gguf"))
    for card in (merged, gguf):
        assert card.data.base_model == HUB_BASE and card.data.datasets == [HUB_DATA]
        assert card.data.pipeline_tag == "text-generation" and card.data.base_model_relation == "finetune"
        assert {"dpo", "trl", "unsloth"} <= set(card.data.tags)
        assert "| trained (after) | 97% | 90% | +12.35 |" in card.text and "| base (before) | - | 47% | -0.81 |" in card.text
        assert "DPO moved the model towards the chosen reply in 29 of 30" in card.text
        assert f"(https://huggingface.co/{HUB_BASE})" in card.text
    assert merged.data.library_name == "transformers" and "gguf" not in merged.data.tags
    assert "gguf" in gguf.data.tags
    assert "| tiny-f16.gguf | 5.0 | 98% | 97% | pass |" in gguf.text  # smoke.json, one row per GGUF
    assert "| tiny-q4_k_m.gguf | 2.0 | 98% | 97% | pass |" in gguf.text


def test_card_of_the_tiny_recipe_says_what_ran(tmp_path):
    from huggingface_hub import ModelCard

    from app.card import write_model_card

    run = make_run(tmp_path)
    write_model_card(run)
    card = ModelCard.load(run / "gguf" / "README.md")
    # tiny and a local data file are no hub ids: the text says what they are, the metadata leaves them out
    assert card.data.base_model is None and card.data.datasets is None and card.data.license is None
    assert "demo model built locally" in card.text and "`recipes/data/tiny_prefs.jsonl` (a local file)" in card.text
    assert "270 examples trained, 30 held out" in card.text
    assert "- method: dpo, 60 steps; LoRA r 16, alpha 32, on a 4-bit (nf4) base" in card.text
    assert "- hyperparameters: beta 0.1, learning rate 0.0004, batch 8 x 1 accumulated" in card.text
    assert "- chat template: tiny family" in card.text
    assert "llama-cli -m tiny-q4_k_m.gguf -cnv" in card.text  # the file the Modelfile names
    assert "ollama create NAME -f Modelfile" in card.text


def test_card_text_is_a_pure_function_of_the_run_facts(tmp_path):
    """A failed GGUF, an eval.json and a stage after sft, without files: what card_text shows of each."""
    from huggingface_hub import ModelCard

    from app.card import card_text, read_run

    facts = read_run(make_run(tmp_path, overrides=[f"model.name={HUB_BASE}"]))
    facts["smoke"]["results"][1] = smoke_result("tiny-q4_k_m.gguf", "q4_k_m", 2 * MIB, False, "no chat template")
    facts["eval"] = {"results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.4123, "acc_stderr,none": 0.005}}}
    facts["earlier_runs"] = ["tiny-sft-20260101-110000"]
    facts["chat_family"] = None
    text = card_text("gguf", facts)
    assert "| tiny-q4_k_m.gguf | 2.0 | 98% | 97% | FAIL: no chat template |" in text
    assert "| hellaswag | acc,none | 0.4123 |" in text and "alias" not in text
    assert "then tiny-sft-20260101-110000 (earlier stages)" in text
    assert "a layout this app does not recognise" in text
    assert ModelCard(text).data.base_model == HUB_BASE
    facts.update(eval=None, smoke=None, train={**facts["train"], "preference": {}})
    text = card_text("merged", facts)
    assert "## Benchmarks" not in text and "## llama.cpp check" not in text and "## Held-out" not in text


def test_llama_cpp_reads_a_folder_with_our_card(tmp_path):
    """llama.cpp's converter reads README.md of the folder it converts (a later stage's export.base converts
    the previous stage's merged/): our card must parse there too, and name the base."""
    from gguf.metadata import Metadata

    from app.card import write_model_card

    run = make_run(tmp_path, overrides=[f"model.name={HUB_BASE}", f"data.source={HUB_DATA}"])
    write_model_card(run)
    metadata = Metadata.load(None, run / "merged", None, 0)
    assert metadata.base_models[0]["repo_url"] == f"https://huggingface.co/{HUB_BASE}"
    assert "dpo" in metadata.tags


def test_a_reward_run_gets_no_card(tmp_path):
    from app.card import write_model_card

    run = make_run(tmp_path, method="reward")
    assert write_model_card(run) == [] and not list(run.rglob("README.md"))


def test_the_tiny_run_has_both_cards_in_its_manifest(tiny_run):
    from huggingface_hub import ModelCard

    manifest = json.loads((tiny_run / "manifest.json").read_text())["files"]
    train = json.loads((tiny_run / "train.json").read_text())
    for kind in ("merged", "gguf"):
        assert f"{kind}/README.md" in manifest
        card = ModelCard.load(tiny_run / kind / "README.md")
        assert card.data.pipeline_tag == "text-generation" and "dpo" in card.data.tags
        trained = train["preference"]["trained"]
        assert f"| trained (after) | {trained['reward_accuracy']:.0%} | {trained['accuracy']:.0%} |" in card.text
    assert "| tiny-q8_0.gguf |" in (tiny_run / "gguf" / "README.md").read_text()


def push(capsys, *args) -> tuple[int, str, str]:
    code = main(["push", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_push_dry_run_lists_each_file_with_its_size(tmp_path, capsys):
    from app.card import write_model_card

    run = make_run(tmp_path)
    write_model_card(run)
    code, out, err = push(capsys, run, "--repo", "someone/tiny-dpo", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    # merged/ at the repo's root, gguf/ in gguf/; nothing else of the run, no temporary files
    assert "   3.0 MiB  model.safetensors" in lines and "   5.0 MiB  gguf/tiny-f16.gguf" in lines
    assert {line.split()[-1] for line in lines[:-1]} == {
        "README.md", "config.json", "model.safetensors", "tokenizer_config.json",
        "gguf/README.md", "gguf/Modelfile", "gguf/tiny-f16.gguf", "gguf/tiny-q4_k_m.gguf"}
    assert lines[-1].split()[:4] == ["10.0", "MiB", "in", "8"] and "nothing uploaded" in lines[-1]


def test_push_gguf_only_puts_gguf_at_the_root_and_no_safetensors(tmp_path, capsys):
    from app.card import write_model_card

    run = make_run(tmp_path)
    write_model_card(run)
    code, out, _ = push(capsys, run, "--repo", "tiny-dpo-gguf", "--gguf-only", "--dry-run")
    assert code == 0 and ".safetensors" not in out
    assert {line.split()[-1] for line in out.splitlines()[:-1]} == {
        "README.md", "Modelfile", "tiny-f16.gguf", "tiny-q4_k_m.gguf"}


def one_error_line(err: str) -> str:
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_push_without_a_token_says_how_to_log_in(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # not logged in
    code, _, err = push(capsys, make_run(tmp_path), "--repo", "someone/tiny-dpo")
    assert code == 2 and "hf auth login" in one_error_line(err)


def test_push_offline_uploads_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = push(capsys, make_run(tmp_path), "--repo", "someone/tiny-dpo")
    assert code == 2 and "not reachable" in one_error_line(err)


@pytest.mark.parametrize("repo", ["a/b/c", "two--dashes", "someone/", "bad name"])
def test_push_refuses_a_repo_id_the_hub_would(tmp_path, capsys, repo):
    code, _, err = push(capsys, make_run(tmp_path), "--repo", repo, "--dry-run")
    assert code == 2 and "NAME or USER/NAME" in one_error_line(err)


def test_push_of_a_run_without_exports_says_so(tmp_path, capsys):
    code, _, err = push(capsys, make_run(tmp_path, method="reward"), "--repo", "someone/scorer", "--dry-run")
    assert code == 2 and "has no merged/ or gguf/ to push" in one_error_line(err)


def test_push_refuses_an_unfinished_or_changed_run(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    gguf = run / "gguf" / "tiny-q4_k_m.gguf"
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"\1")  # changed after the export checked it
    code, _, err = push(capsys, run, "--repo", "someone/tiny-dpo")
    assert code == 2 and "gguf/tiny-q4_k_m.gguf: sha256 differs" in one_error_line(err)
    (run / "manifest.json").unlink()  # an export that never finished
    code, _, err = push(capsys, run, "--repo", "someone/tiny-dpo", "--dry-run")
    assert code == 2 and "has no manifest.json" in one_error_line(err)
