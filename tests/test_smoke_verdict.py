"""The smoke verdict is a pure function of measures: a correct GGUF passes, a broken one fails, and a
16-bit file may disagree with the reference only where the reference's top-2 gap is within the measured
error. No GGUF is opened here: the measures are written out as the smoke stage records them."""
from app.smoke import smoke_verdict


def measures(**changes):
    m = {"metadata": {"architecture": "llama", "eos_token_id": 2, "has_chat_template": True},
         "tokenizer_eos_id": 2, "prompt_mismatch": None,
         "probes": [{"prompt_tokens": 12, "hf_reply_tokens": 20, "matching_lead": 20, "chat_finish_reason": "stop"}],
         "max_abs_logit_diff": 0.1, "logit_scale": 20.0, "top1_agreement": 1.0, "decisive_top1": 1.0,
         "top1_beyond_noise": 1.0, "greedy_lead_share": 1.0,
         "preference": {"agreement": 1.0, "agreement_beyond_ties": 1.0}}
    m.update(changes)
    return m


def test_a_faithful_16_bit_file_passes_and_near_ties_are_excused():
    assert smoke_verdict("f16", measures()) == []
    # 128k vocabularies: 99.5% raw top-1, every disagreement at a near-tie (gap <= 2 x measured error)
    assert smoke_verdict("f16", measures(top1_agreement=0.995, decisive_top1=1.0)) == []
    tie = [{"prompt_tokens": 12, "hf_reply_tokens": 20, "matching_lead": 7, "gap_at_divergence": 0.15,
            "chat_finish_reason": "stop"}]
    assert smoke_verdict("bf16", measures(probes=tie)) == []
    # the held-out pair ranking may flip only at rounding-sized margins
    assert smoke_verdict("f16", measures(preference={"agreement": 0.97, "agreement_beyond_ties": 1.0})) == []


def test_a_broken_16_bit_file_fails():
    assert any("decisive" in p for p in smoke_verdict("f16", measures(top1_agreement=0.99, decisive_top1=0.99)))
    diverges = [{"prompt_tokens": 12, "hf_reply_tokens": 20, "matching_lead": 7, "gap_at_divergence": 1.5,
                 "chat_finish_reason": "stop"}]
    assert any("without a tie" in p for p in smoke_verdict("f16", measures(probes=diverges)))
    # a large logit error must not excuse everything: it fails by itself, relative to the logits' scale
    assert any("max logit difference" in p for p in smoke_verdict("f16", measures(max_abs_logit_diff=0.5)))
    assert any("did not stop" in p for p in smoke_verdict("f16", measures(probes=[
        {"prompt_tokens": 12, "hf_reply_tokens": 20, "matching_lead": 20, "chat_finish_reason": "length"}])))
    assert any("prompt ids" in p for p in smoke_verdict("f16", measures(prompt_mismatch=(13, 12))))
    assert any("EOS id" in p for p in smoke_verdict("f16", measures(tokenizer_eos_id=3)))
    assert any("held-out pairs" in p for p in smoke_verdict(
        "f16", measures(preference={"agreement": 0.9, "agreement_beyond_ties": 0.93})))


def test_quantized_files_are_judged_where_the_reference_is_clear_of_their_noise():
    assert smoke_verdict("q4_k_m", measures(max_abs_logit_diff=1.7, top1_agreement=0.96, decisive_top1=0.9,
                                            top1_beyond_noise=0.99, greedy_lead_share=0.5)) == []
    # a near-flat reference (a random model): most tokens are coin flips under 4-bit noise, and say nothing
    flat = [{"prompt_tokens": 12, "hf_reply_tokens": 48, "matching_lead": 2, "gap_at_divergence": 0.01,
             "noise_at_divergence": 0.3}]
    assert smoke_verdict("q4_k_m", measures(max_abs_logit_diff=1.0, top1_agreement=0.4, top1_beyond_noise=1.0,
                                            probes=flat)) == []
    assert any("top-1 agreement" in p for p in smoke_verdict("q4_k_m", measures(top1_beyond_noise=0.5)))
    clear = [{"prompt_tokens": 12, "hf_reply_tokens": 48, "matching_lead": 2, "gap_at_divergence": 3.0,
              "noise_at_divergence": 0.3}]
    assert any("without a tie" in p for p in smoke_verdict("q8_0", measures(probes=clear)))
    # measured (make grpo, tiny): q8_0 swapped two tokens 0.0625 apart, where its largest logit error was 0.053
    # (two logits each off by that can swap up to 0.106) though its spread gave 0.061: a tie, not a broken file
    swapped = [{"prompt_tokens": 12, "hf_reply_tokens": 48, "matching_lead": 32, "gap_at_divergence": 0.0625,
                "noise_at_divergence": 0.0607, "error_at_divergence": 0.0530}]
    assert smoke_verdict("q8_0", measures(probes=swapped)) == []
    clear[0]["error_at_divergence"] = 0.2  # the same file's error cannot swap a gap of 3.0
    assert any("without a tie" in p for p in smoke_verdict("q8_0", measures(probes=clear)))
    assert any("max logit difference" in p for p in smoke_verdict("q8_0", measures(max_abs_logit_diff=5.0)))
