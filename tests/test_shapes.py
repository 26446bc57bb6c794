"""app/shapes.py: the Llama 3 tokenizer rebuilt offline is the real one (llama.cpp's own test vectors, through
transformers and through a converted GGUF), and the parameter arithmetic matches a built model."""
import pytest

from app.llamacpp import VOCABS, run_converter
from app.shapes import LLAMA3_VOCAB, SHAPES, count_parameters

# test-only: the real vocabulary on one small layer (hidden 256: k-quant rows would fit too); ~66M parameters,
# nearly all in the two embedding matrices
TINY = {**SHAPES["gpu-check"], "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def llama3_test_vectors():
    """(input, expected ids) pairs of llama.cpp's test-tokenizer-0 for Llama 3: inputs each followed by a
    `__ggml_vocab_test__` line, ids one input per line, space-separated (an empty input: an empty line)."""
    inputs = (VOCABS / f"{LLAMA3_VOCAB}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = (VOCABS / f"{LLAMA3_VOCAB}.out").read_text(encoding="utf-8").split("\n")[:len(inputs)]
    assert len(inputs) == len(expected) == 46
    return [(text, [int(t) for t in ids.split()]) for text, ids in zip(inputs, expected)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """One small random model with the real tokenizer for the whole module (the GGUF import alone takes ~20 s)."""
    from app.shapes import build_random_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SHAPES, "test-tiny", TINY)
        yield build_random_model(tmp_path_factory.mktemp("shapes") / "model", "test-tiny")


def test_tokenizer_reproduces_llama_cpp_test_vectors(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    differ = [text for text, ids in llama3_test_vectors() if tokenizer(text, add_special_tokens=False).input_ids != ids]
    assert len(differ) <= 1, f"{46 - len(differ)}/46 test vectors; differ: {differ!r}"  # measured: 46/46

    assert len(tokenizer) == 128256
    assert tokenizer("Hello world").input_ids == [128000, 9906, 1917]  # <|begin_of_text|> in front
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|eot_id|>", 128009)
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id, 128001)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_converts_as_llama_bpe_and_llama_cpp_tokenizes_the_same(tiny_model, tmp_path):
    import llama_cpp
    from transformers import AutoTokenizer

    gguf = tmp_path / "tiny-f16.gguf"
    log = run_converter(tiny_model, gguf, "f16")  # an unknown pre-tokenizer hash would fail it
    # at INFO the converter names no pre-tokenizer: it logs the BPE merges of the gpt2 path (the Llama 2 path
    # has none), and the GGUF records the pre-tokenizer the hash identified
    assert "Adding 280147 merge(s)" in log, log[-2000:]

    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    meta = llm.metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"  # not Llama 2's SPM
    assert (llm.token_bos(), llm.token_eos()) == (128000, 128009)
    assert "<|start_header_id|>" in meta["tokenizer.chat_template"]

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    vectors = llama3_test_vectors()
    same = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            == tokenizer(text, add_special_tokens=False).input_ids == ids for text, ids in vectors]
    assert sum(same) == len(vectors), f"{sum(same)}/{len(vectors)}"  # measured: 46/46
    # chat markers are control tokens in the GGUF: one id each, as transformers has them
    header = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    ids = tokenizer(header, add_special_tokens=False).input_ids
    assert llm.tokenize(header.encode(), add_bos=False, special=True) == ids and len(ids) == 6


def test_parameter_count_matches_the_built_model(tiny_model):
    import json

    from safetensors import safe_open
    from transformers import GenerationConfig

    assert 0.35e9 <= count_parameters("scale") <= 1.0e9
    assert 7.9e9 <= count_parameters("llama3-8b") <= 8.1e9  # Meta-Llama-3-8B: 8.03B
    numel = 0
    for shard in tiny_model.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                assert tensor.get_dtype() == "BF16", name
                shape = tensor.get_shape()
                numel += shape[0] * (shape[1] if len(shape) > 1 else 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SHAPES, "test-tiny", TINY)
        assert numel == count_parameters("test-tiny")

    config = json.loads((tiny_model / "config.json").read_text())
    assert (config["vocab_size"], config["pad_token_id"], config["tie_word_embeddings"]) == (128256, 128004, False)
    assert GenerationConfig.from_pretrained(str(tiny_model)).eos_token_id == [128001, 128009]
