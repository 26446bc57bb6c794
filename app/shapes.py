"""Random models of real architectures with real tokenizers, built offline: for the GPU check, the scale
benchmark and tests. Speed and memory do not depend on weight values.

The tokenizer is Meta's Llama 3 one, rebuilt from llama.cpp's tokenizer test vocabulary
(.llamacpp/models/ggml-vocab-llama-bpe.gguf, unpacked by `make setup`); the weights are random, of the
Llama 3 layout (128,256-token vocabulary, untied embeddings, grouped-query attention, RoPE theta 500k).
"""
import json
from pathlib import Path

from app.llamacpp import VOCABS

LLAMA3_VOCAB = "ggml-vocab-llama-bpe.gguf"
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False,
               max_position_embeddings=8192, rms_norm_eps=1e-5, num_key_value_heads=8)

SHAPES = {
    # Meta-Llama-3-8B: for reference and to extrapolate measurements (8.03B parameters); not built on a CPU
    "llama3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32},
    # ~0.40B, two thirds of it the two 128256 x 1024 embedding matrices, as in small real models
    "scale": {**_LLAMA3, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 10,
              "num_attention_heads": 16},
    # ~0.14B, nearly all embeddings: a whole DPO run through the real vocabulary takes seconds on a GPU
    "gpu-check": {**_LLAMA3, "hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 2,
                  "num_attention_heads": 8},
}

# Llama 3's pre-tokenizer split, as in Meta's tokenizer.json; llama.cpp's LLAMA3 pre-tokenizer is the same
# expression with the case-insensitive contractions spelled out. transformers' GGUF import replaces it with
# GPT-2's ByteLevel regex, which changes the token ids and so the hash convert_hf_to_gguf.py identifies
# `llama-bpe` by.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Meta-Llama-3-8B-Instruct's chat template, verbatim
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def count_parameters(shape_name: str) -> int:
    """Parameters of SHAPES[shape_name] from the config arithmetic (no bias terms in Llama), no model built."""
    s = SHAPES[shape_name]
    h, layers, vocab = s["hidden_size"], s["num_hidden_layers"], s["vocab_size"]
    head_dim = s.get("head_dim") or h // s["num_attention_heads"]
    q_o = 2 * h * s["num_attention_heads"] * head_dim
    k_v = 2 * h * s["num_key_value_heads"] * head_dim
    per_layer = q_o + k_v + 3 * h * s["intermediate_size"] + 2 * h  # + the two RMSNorm weights
    embeddings = vocab * h * (1 if s["tie_word_embeddings"] else 2)
    return embeddings + layers * per_layer + h  # + the final norm


def _special(tokenizer_json: dict, name: str) -> int | None:
    return next((t["id"] for t in tokenizer_json["added_tokens"] if t["content"] == name), None)


def build_llama3_tokenizer(out_dir: Path):
    """Meta's Llama 3 (Instruct) tokenizer in out_dir, from llama.cpp's test vocabulary; returns it.

    transformers' GGUF import keeps the vocabulary, merges and special tokens but writes an SPM-style
    tokenizer.json (byte fallback, GPT-2's regex, no BOS): llama.cpp's converter then takes the Llama 2 path
    and llama.cpp aborts on it. The fields are set back to Meta's. The test vocabulary is Llama 3's (not
    3.1's): it has no <|finetune_right_pad_id|>, so padding falls back to a reserved special token."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    AutoTokenizer.from_pretrained(str(VOCABS), gguf_file=LLAMA3_VOCAB).save_pretrained(str(out_dir))  # 20-30 s, 1.1 GB
    path = out_dir / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    bos = _special(spec, "<|begin_of_text|>")
    spec["normalizer"] = None
    spec["model"].update(byte_fallback=False, ignore_merges=True, fuse_unk=False)
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    begin = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [begin, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [begin, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos],
                                                 "tokens": ["<|begin_of_text|>"]}}}
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")

    pad = next(name for name in ("<|finetune_right_pad_id|>", "<|reserved_special_token_2|>")  # 128004 either way
               if _special(spec, name) is not None)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|begin_of_text|>", "<|eot_id|>", pad
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))

    # as a hub download has it: which added tokens are special is read from here by llama.cpp's SpecialVocab
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # Meta's; transformers 4 cannot import TokenizersBackend
    config.pop("model_type", None)  # "gpt2", left by the GGUF import
    config["clean_up_tokenization_spaces"] = False  # transformers 5 ignores it for BPE, with a warning
    config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                      for t in spec["added_tokens"]}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return AutoTokenizer.from_pretrained(str(out_dir))


def build_random_model(out_dir: Path, shape: str, dtype="bfloat16", seed=0) -> Path:
    """out_dir: the Llama 3 tokenizer + a LlamaForCausalLM of SHAPES[shape] with seeded random weights,
    safetensors in dtype. The weights are created in dtype (no float32 copy): "scale" peaks at 1.45 GB RSS for
    its 0.81 GB of weights, and the tokenizer's GGUF import alone at 1.1 GB (Python objects of 280k merges)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llama3_tokenizer(out_dir)
    end_of_text = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=[end_of_text, tokenizer.eos_token_id])
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
