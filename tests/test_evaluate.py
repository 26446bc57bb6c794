"""Held-out scoring in batches gives each pair the scores it gets alone (padding after a sequence cannot
change its causal logits): float32 tiny model, 1e-4 nats, whatever the batch holds."""
import pytest
import torch

from app import evaluate
from app.evaluate import held_out_pairs, score_pairs_hf


@pytest.mark.slow  # builds the tiny model when it is not built yet (3 minutes)
def test_batched_scores_equal_one_sequence_at_a_time(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.data import load_preference_data
    from app.recipe import load_recipe
    from app.tiny import ensure_model

    folder = ensure_model()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pairs, _ = held_out_pairs(load_preference_data(load_recipe("tiny").data).eval, tokenizer, 12, None)
    batched = score_pairs_hf(model, pairs)
    monkeypatch.setattr(evaluate, "LOGITS_BYTES", 1)  # one sequence per batch
    alone = score_pairs_hf(model, pairs)
    assert len(batched) == len(alone) == 12
    assert max(abs(a - b) for x, y in zip(batched, alone) for a, b in zip(x, y)) < 1e-4
