"""The reference log-prob cache (app/refcache.py): a cached run trains as an uncached one, any change to what
the reference depends on misses the cache, and a damaged cache file is refused and scored again.

Margins: with the cache, TRL's loss reads the reference log-probs scored in one pass over the data in
dataset order; without it, it scores them inside each shuffled batch. The same sequences, the same
weights; only the padding around a sequence differs, which changes a float32 sum of log-probs in its last
bits. Measured on tiny over 20 steps: the two loss curves differ by at most 8e-7 (the loss falls
0.693 -> 0.485). The tolerance, 1e-4, is over 100x that and still 2000x below the loss's fall.
"""
import json
import logging

import pytest
import torch

from app.refcache import (cache_key, load_log_probs, save_log_probs, should_precompute, token_ids_digest,
                          weight_file_hashes)

STEPS = 20


# --- pure: the decision and the key -------------------------------------------------------------------------

def test_auto_scores_up_front_only_when_that_is_cheaper_and_always_uses_a_cache():
    # tiny's own run: 270 + 30 pairs up front against 60 steps x 8 pairs and 4 evaluations of 30
    assert should_precompute("auto", False, 270, 30, 480, 4)[0]
    assert not should_precompute("auto", False, 270, 30, 80, 1)[0]  # 10 steps: less than one pass
    assert should_precompute("auto", True, 270, 30, 80, 1) == (True, "cached")
    assert should_precompute(True, False, 270, 30, 8, 0)[0]
    assert not should_precompute(False, True, 270, 30, 480, 4)[0]  # false means the reference in every step


def test_the_runs_own_reference_passes_count_every_evaluation():
    from types import SimpleNamespace

    from app.refcache import reference_passes

    args = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, world_size=1, max_steps=60,
                num_train_epochs=3, eval_strategy="steps", eval_steps=20, logging_steps=5)
    assert reference_passes(SimpleNamespace(**args), 270) == (480, 4)  # step 0, 20, 40, 60 (the end reuses 60)
    assert reference_passes(SimpleNamespace(**{**args, "eval_steps": 25}), 270) == (480, 4)  # 0, 25, 50, end
    # no evaluation strategy still evaluates at step 0 and at the end; one epoch of 58 pairs at batch 2
    one_epoch = {**args, "max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 2, "eval_strategy": "no"}
    assert reference_passes(SimpleNamespace(**one_epoch), 58) == (58, 2)


PARTS = {"weights": {"model.safetensors": "a" * 64, "config.json": "b" * 64}, "token_ids": "c" * 64, "rows": 270,
         "chat_template": "d" * 64, "special_ids": [1, 2, 0],
         "dpo": {"max_length": 128, "truncation_mode": "keep_start", "ld_alpha": None, "padding_free": False,
                 "pad_to_multiple_of": None},
         "load_in_4bit": True, "dtype": "torch.float32", "autocast": [False, False], "device": "cpu",
         "versions": {"torch": "2.13.0", "trl": "1.15.0"}}


def changed_copies(value, path=()):
    """Every way of changing one leaf of `value`: (path, changed copy of the whole)."""
    if isinstance(value, dict):
        for k, v in value.items():
            for p, new in changed_copies(v, path + (k,)):
                yield p, {**value, k: new}
    elif isinstance(value, list):
        for i, v in enumerate(value):
            for p, new in changed_copies(v, path + (i,)):
                yield p, value[:i] + [new] + value[i + 1:]
    else:
        yield path, ({True: False, False: True}.get(value, 1) if isinstance(value, bool) or value is None
                     else value + 1 if isinstance(value, int) else str(value) + "x")


def test_changing_any_part_of_the_key_misses():
    key = cache_key(PARTS)
    changes = list(changed_copies(PARTS))
    assert len(changes) >= 17
    for path, parts in changes:
        assert cache_key(parts) != key, path
    assert cache_key(json.loads(json.dumps(PARTS))) == key  # and the same parts give the same key


def test_a_weight_file_changed_in_place_gets_a_new_hash(tmp_path):
    folder, memo = tmp_path / "model", tmp_path / "memo.json"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")  # not a weight file: the token ids are keyed instead
    first = weight_file_hashes(folder, memo)
    assert set(first) == {"model.safetensors", "config.json"} and weight_file_hashes(folder, memo) == first
    (folder / "model.safetensors").write_bytes(b"\0" * 999 + b"\1")  # same size, one byte
    assert weight_file_hashes(folder, memo)["model.safetensors"] != first["model.safetensors"]


def test_token_ids_digest_reads_every_id_in_order():
    from datasets import Dataset

    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 10]}]
    digest = token_ids_digest(Dataset.from_list(rows))
    assert token_ids_digest(Dataset.from_list(rows).select([0, 1])) == digest
    assert token_ids_digest(Dataset.from_list(rows[::-1])) != digest
    moved = [{**rows[0], "prompt_ids": [1], "chosen_ids": [2, 3, 4, 5]}, rows[1]]  # same ids, other boundary
    assert token_ids_digest(Dataset.from_list(moved)) != digest


# --- the cache file -----------------------------------------------------------------------------------------

def test_a_damaged_cache_file_is_refused(tmp_path, caplog):
    chosen, rejected = -torch.rand(50) * 60, -torch.rand(50) * 60
    path = tmp_path / "k.safetensors"
    save_log_probs(path, "k", chosen, rejected)
    loaded = load_log_probs(path, "k", 50)
    assert torch.equal(loaded[0], chosen) and torch.equal(loaded[1], rejected)
    assert load_log_probs(path, "other", 50) is None and load_log_probs(path, "k", 49) is None

    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one bit of one value, the header intact: only the digest can tell
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert load_log_probs(path, "k", 50) is None
    assert "differ from the digest" in caplog.text
    path.write_bytes(bytes(data[: len(data) // 2]))  # an interrupted copy
    assert load_log_probs(path, "k", 50) is None
    save_log_probs(path, "k", chosen.abs(), rejected)  # a positive sum of log-probabilities cannot be
    assert load_log_probs(path, "k", 50) is None


# --- the real thing: tiny's DPO with and without the cache -------------------------------------------------

def train_tiny(overrides, cache, steps=STEPS):
    """`steps` DPO steps of the tiny recipe through the app's own stages, with the reference cache in
    `cache`; (training losses per logging step, what the cache did, the trainer's train dataset)."""
    from app.data import load_training_data
    from app.model import load_model, local_model_folder, resolve_model_source
    from app.recipe import load_recipe
    from app.refcache import attach_reference_log_probs
    from app.train import make_trainer

    recipe = load_recipe("tiny", [f"dpo.max_steps={STEPS}", "dpo.eval_strategy='no'", "dpo.save_strategy='no'",
                                  "dpo.logging_steps=2", "data.eval_share=0", *overrides])
    data = load_training_data(recipe.data, "dpo")
    model, tokenizer = load_model(recipe, resolve_model_source(recipe))
    trainer = make_trainer("dpo", model, tokenizer, data, recipe, cache / "run", [])
    info = attach_reference_log_probs(trainer, recipe, local_model_folder("tiny"), cache=cache)
    if steps:
        trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], info, trainer.train_dataset


@pytest.mark.slow
def test_a_cached_run_trains_as_an_uncached_one_and_a_change_misses(tmp_path, caplog):
    plain, off, _ = train_tiny(["dpo.precompute_ref_log_probs=false"], tmp_path)
    assert not off["precomputed"] and not list(tmp_path.glob("*.safetensors"))
    cold, scored, data = train_tiny(["dpo.precompute_ref_log_probs=true"], tmp_path)
    assert scored["scored"] == ["train"] and len(list(tmp_path.glob("*.safetensors"))) == 1
    warm, hit, _ = train_tiny([], tmp_path)  # auto: the cache is there, so it is used
    assert hit["cached"] == ["train"] and not hit["scored"]

    assert len(plain) == STEPS // 2 and plain[-1] < plain[0] - 0.02, plain
    assert warm == cold  # the same cached values: bit for bit the same run
    gap = max(abs(a - b) for a, b in zip(plain, cold))
    assert gap < 1e-4, (gap, plain, cold)  # see the module docstring; measured 8e-7
    assert all(r <= 0 for r in data["ref_chosen_logps"])

    # each part that changes the reference's inputs misses: the truncation, the tokenized pairs
    _, longer, _ = train_tiny(["dpo.precompute_ref_log_probs=true", "dpo.max_length=96"], tmp_path, steps=0)
    assert longer["scored"] == ["train"]
    _, other_data, _ = train_tiny(["dpo.precompute_ref_log_probs=true", "data.seed=1"], tmp_path, steps=0)
    assert other_data["scored"] == ["train"] and len(list(tmp_path.glob("*.safetensors"))) == 3

    # a damaged file is refused and scored again, to the same values (true: auto would now score the
    # reference in each step, as 20 steps see fewer pairs than one pass)
    (path,) = [tmp_path / f"{k}.safetensors" for k in hit["keys"].values()]
    good = path.read_bytes()
    path.write_bytes(good[:-8] + bytes(8))
    with caplog.at_level(logging.WARNING):
        _, rescored, _ = train_tiny(["dpo.precompute_ref_log_probs=true"], tmp_path, steps=0)
    assert rescored["scored"] == ["train"] and "differ from the digest" in caplog.text
    fixed = load_log_probs(path, hit["keys"]["train"], len(data))
    assert fixed is not None and torch.allclose(fixed[0], torch.tensor(data["ref_chosen_logps"]), atol=1e-4)
