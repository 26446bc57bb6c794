"""The merged 16-bit export of a 4-bit run is the trained model, up to 16-bit rounding, and its check
fails a merge whose adapter is lost or mis-scaled.

The trained model is tiny's 4-bit base (nf4, bitsandbytes on the CPU) with the tiny_run fixture's
adapter, loaded as `python -m app export RUN` loads it. Margins: a correct merge is within 0.5 ulp of the
exact float32 merge by construction (one rounding), and its logits differ from the trained model's by 16-bit
rounding alone; a 2x adapter misses by the adapter's whole effect. Both hold for any build of tiny.
"""
import socket

import pytest
import torch

from app import AppError
from app.export import check_merged_weights, merge_adapter, merge_verdict, weight_error
from app.model import load_trained_model
from app.recipe import run_recipe


@pytest.fixture(scope="module")
def trained(tiny_run):
    recipe = run_recipe(tiny_run)
    assert recipe.model.load_in_4bit  # the mission's path: tiny trains on a 4-bit base
    model, tokenizer = load_trained_model(recipe, tiny_run / "adapter")
    return model, tokenizer


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_a_4bit_merge_is_the_trained_model_and_a_mis_scaled_one_fails(trained, tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = trained
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    merge_adapter(model, tokenizer, tmp_path / "merged", str(tiny_run / "merged"), torch.bfloat16)
    verdict = check_merged_weights(model, tmp_path / "merged")
    assert verdict["passed"] and verdict["max_ulps"] <= 0.75 and verdict["changed_share"] > 0.01, verdict

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about bees."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    model.eval()
    trained_logits = logits(model, ids)
    with model.disable_adapter():
        effect = (trained_logits - logits(model, ids)).abs().max().item()
    error = (trained_logits - logits(merged, ids)).abs().max().item()
    assert error < 0.1 * effect, (error, effect)  # measured on tiny: error ~0.03, effect ~5

    lora_b = [p for n, p in model.named_parameters() if "lora_B.default" in n]
    saved = [p.data.clone() for p in lora_b]
    try:
        for p in lora_b:  # the live model now has twice the adapter the file was merged with
            p.data *= 2
        with pytest.raises(AppError, match="differ from the exact merge by more than rounding"):
            check_merged_weights(model, tmp_path / "merged")
        assert (logits(model, ids) - logits(merged, ids)).abs().max().item() > 0.5 * effect
        for p in lora_b:  # and none: a lost adapter
            p.data.zero_()
        with pytest.raises(AppError, match="differ from the exact merge"):
            check_merged_weights(model, tmp_path / "merged")
    finally:
        for p, data in zip(lora_b, saved):
            p.data = data


def test_a_bfloat16_adapter_whose_terms_cancel_merges_within_rounding(trained, tiny_run, tmp_path):
    """TRL trains a 4-bit model's adapter in bfloat16; in the training process PEFT's get_delta_weight then
    multiplies B @ A in bfloat16, whose partial sums are rounded (8 ulp measured on SmolLM2). Here one layer's
    adapter is made of terms that cancel to 1/128 of their size: the merge must still be within rounding."""
    model, tokenizer = trained
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    saved = [p.data.clone() for p in (a.weight, b.weight)]
    try:
        half = a.weight.shape[0] // 2
        g = torch.Generator().manual_seed(0)
        a_half, b_half = torch.randn(half, a.weight.shape[1], generator=g), torch.randn(b.weight.shape[0], half, generator=g)
        a.weight.data = torch.cat([a_half, a_half]).bfloat16() * 0.05
        b.weight.data = torch.cat([b_half, -b_half * (1 + 2 ** -7)], dim=1).bfloat16() * 0.01
        merge_adapter(model, tokenizer, tmp_path / "merged", str(tiny_run / "merged"), torch.bfloat16)
        verdict = check_merged_weights(model, tmp_path / "merged")
        assert verdict["passed"] and verdict["max_ulps"] <= 0.75, verdict
        assert a.weight.dtype == b.weight.dtype == torch.bfloat16  # the live adapter is left as it was
    finally:
        a.weight.data, b.weight.data = saved


def test_rounding_passes_at_any_step_count_and_a_2x_adapter_fails():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, 256, generator=g) * 0.02
    lora = torch.randn(256, 256, generator=g) * 0.002                    # a trained adapter: ~10% of the weights
    rounding = base * torch.randn(256, 256, generator=g) * 2 ** -14    # two steps: far below bf16's spacing
    for delta in (lora, rounding):
        saved = (base + delta).to(torch.bfloat16)
        assert merge_verdict([weight_error("w", saved, base, delta)])["passed"]
    assert merge_verdict([weight_error("w", (base + rounding).to(torch.bfloat16), base, rounding)])["changed_share"] < 0.05
    wrong = merge_verdict([weight_error("w", (base + 2 * lora).to(torch.bfloat16), base, lora)])
    assert not wrong["passed"] and "by more than rounding" in wrong["reason"]
    lost = merge_verdict([weight_error("w", base.to(torch.bfloat16), base, lora)])
    assert not lost["passed"]
    missing = merge_verdict([weight_error("w", base.to(torch.bfloat16), base, None), {"name": "v", "missing": True}])
    assert not missing["passed"] and "v is missing" in missing["reason"]
    shape = merge_verdict([weight_error("w", base[:, :8].to(torch.bfloat16), base, None)])
    assert not shape["passed"] and "wrong shape" in shape["reason"]


def test_export_and_smoke_never_touch_the_network(tiny_run_copy, monkeypatch):
    """`export RUN` (reload, merge, convert, quantize, smoke) with every non-loopback connection refused."""
    import shutil

    from app.cli import main

    def refuse(self, address, *args):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test: network is off ({host})")
        return real_connect(self, address, *args)
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # no offline flag to lean on
    shutil.rmtree(tiny_run_copy / "merged")
    assert main(["export", str(tiny_run_copy)]) == 0
    assert (tiny_run_copy / "merged" / "model.safetensors").is_file()
