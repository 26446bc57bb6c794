"""Real tokenizers that users bring (Llama 3's and Qwen2's BPE) through export and smoke.

Built offline from llama.cpp's tokenizer test vocabularies (models/ggml-vocab-*.gguf in the llama-cpp-python
source that setup unpacks into .llamacpp/), on a tiny random model of the matching architecture. What is
tested is the converter's pre-tokenizer check, the special tokens, EOS and the real chat templates."""
import json

import pytest
import torch

from app.export import convert_to_gguf, prepare_tokenizer_for_converter
from app.llamacpp import VOCABS
from app.model import fix_chat_template, import_unsloth
from app.smoke import check_ggufs

# Llama 3's pre-tokenizer. transformers rebuilds the vocabulary and merges from the GGUF test file but not
# this split (it falls back to GPT-2's ByteLevel regex and turns on byte fallback), so it is put back here
# and checked against llama.cpp's own Llama 3 test vectors below.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_instruct_tokenizer(folder):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(VOCABS), gguf_file="ggml-vocab-llama-bpe.gguf").save_pretrained(str(folder))
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    spec["model"]["byte_fallback"] = False
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.eos_token = "<|eot_id|>"  # as in Llama-3-8B-Instruct: the end of an assistant turn
    return fix_chat_template(tokenizer, "llama-3", "llama3")


def qwen2_tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(VOCABS), gguf_file="ggml-vocab-qwen2.gguf")  # has its template


FAMILIES = {"llama3": ("llama", llama3_instruct_tokenizer, "ggml-vocab-llama-bpe.gguf"),
            "qwen2": ("qwen2", qwen2_tokenizer, "ggml-vocab-qwen2.gguf")}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_real_tokenizer_family_goes_through_export_and_smoke(family, tmp_path):
    import_unsloth()  # first, as in the app
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, make_tokenizer, vocab_file = FAMILIES[family]
    model_dir = tmp_path / "merged"
    model_dir.mkdir()
    tokenizer = make_tokenizer(model_dir)

    # the tokenizer is the real one: llama.cpp's own test vectors for this vocabulary
    inputs = (VOCABS / f"{vocab_file}.inp").read_text().split("\n__ggml_vocab_test__\n")
    expected = (VOCABS / f"{vocab_file}.out").read_text().split("\n")
    matches = [tokenizer(s, add_special_tokens=False).input_ids == [int(t) for t in e.split()]
               for s, e in zip(inputs, expected)]
    assert sum(matches) >= len(matches) - 1, f"{sum(matches)}/{len(matches)} test vectors"

    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    prepare_tokenizer_for_converter(model_dir, str(model_dir))

    ggufs = convert_to_gguf(model_dir, tmp_path / "gguf", family, ["f16"], log=lambda *a: None)
    (result,) = check_ggufs(model_dir, list(ggufs.values()), ["What is the sun?", "Tell me about bees."])
    assert result["passed"], result["reason"]  # includes: same prompt ids through the GGUF's own template
    assert result["metadata"]["has_chat_template"] and result["top1_agreement"] == 1.0
    assert result["metadata"]["eos_token_id"] == tokenizer.eos_token_id
