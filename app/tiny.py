"""The embedded default model: a 3M-parameter Llama with its own SentencePiece tokenizer, built locally.

No hub is reachable on CI, so `tiny` is made here, deterministically, from recipes/data/tiny_corpus.txt:
1. a SentencePiece BPE tokenizer with Llama 2's settings (byte fallback, no normalisation), so that
   llama.cpp's converter takes its sentencepiece path and tokenizes exactly as transformers does;
2. a random Llama with hidden size 256 (k-quants need rows that are multiples of 256);
3. a short supervised warm-up on the corpus: prose, plus dialogues in the chat template whose replies
   alternate between a polite and a rude style, so the base model speaks, ends replies with EOS and has
   no preference yet. This is building the base model (like pre-training), not the alignment step: a
   plain PyTorch loop, deterministic and dependency-free. Alignment goes through Unsloth + TRL.
The result is cached in .cache/tiny-model/ under a fingerprint of the corpus and the settings below.

As few builds as possible: training is chaotic, so one rounding difference in the warm-up (MKL and ATen
pick kernels by CPU: AVX-512 on one machine, AVX2 on another; reductions split by thread count) grows into
another model, with other replies and other test margins. The build therefore runs in a child process
pinned to generic kernels and one thread (PINNED_ENV): a machine builds the same model every time. Across
CPU makers it still differs (measured: f792af0e5d522cf1 on AMD EPYC, e3e2eaaa9ad482a4 on Intel Xeon), so
tests assert what holds for both. `weights_digest` is logged so two machines can compare builds.
"""
import hashlib
import io
import math
import os
import re
import sys
import time
from pathlib import Path

from app import ROOT
from app.built import build_once

CORPUS = ROOT / "recipes" / "data" / "tiny_corpus.txt"
CACHE = ROOT / ".cache" / "tiny-model"

# MKL's conditional numerical reproducibility and ATen's generic (non-AVX) kernels, one thread
PINNED_ENV = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONHASHSEED": "0"}
SETTINGS = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                warmup_steps=400, batch_size=16, lr=3e-3, seed=0)

# The chat template of `tiny`: role markers are SentencePiece user-defined symbols (one token each),
# and every assistant turn ends with EOS, which is how the model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DIALOGUE = re.compile(r"<\|user\|>\\n(.*)\\n<\|assistant\|>\\n(.*)</s>")


def fingerprint() -> str:
    h = hashlib.sha256(CORPUS.read_bytes())
    h.update(Path(__file__).read_bytes())  # any change to how tiny is built rebuilds it
    return h.hexdigest()[:16]


def is_built() -> bool:
    stamp = CACHE / "fingerprint.txt"
    return stamp.exists() and stamp.read_text() == fingerprint()


def check_source():
    """tiny is built from files in the repository: always possible."""


def ensure_model(log=print) -> Path:
    """Path of the built tiny model, building it first if the cache is missing or stale. The child runs
    pinned (PINNED_ENV) from torch's first import, and the caller's threads stay as they are."""
    return build_once(CACHE, "app.tiny", fingerprint, is_built, f"the tiny model in {CACHE} (once; about two minutes)",
                      log, env={**os.environ, **PINNED_ENV}, shown=lambda line: line.startswith("  tiny "))


def read_corpus():
    """(prose lines, [(question, answer)] dialogues) from the corpus file."""
    prose, dialogues = [], []
    for line in CORPUS.read_text().splitlines():
        m = DIALOGUE.fullmatch(line)
        if m:
            dialogues.append(m.groups())
        elif line.strip():
            prose.append(line)
    return prose, dialogues


def train_tokenizer(out: Path, texts):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=SETTINGS["vocab_size"], model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<|system|>", "<|user|>", "<|assistant|>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    # transformers builds vocab + merges from the .model. No prefix space: llama.cpp would add one after every
    # special token (so after each chat marker) where transformers adds one only at the start of the text.
    tokenizer = LlamaTokenizer.from_pretrained(str(out), add_prefix_space=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.unk_token  # a pad that is not EOS, so padding never teaches "stop"
    tokenizer.save_pretrained(str(out))
    return tokenizer


def weights_digest(folder: Path) -> str:
    """sha256 of the saved tensors' values (not the file, whose header may vary), to compare builds."""
    from safetensors.numpy import load_file
    h = hashlib.sha256()
    for name, array in sorted(load_file(str(folder / "model.safetensors")).items()):
        h.update(name.encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def build_tiny_model(out: Path, log=print):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False  # matmuls go to MKL, under MKL_CBWR
    torch.manual_seed(SETTINGS["seed"])
    prose, dialogues = read_corpus()
    tokenizer = train_tokenizer(out, prose + [t for qa in dialogues for t in qa])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=SETTINGS["hidden_size"],
        intermediate_size=SETTINGS["intermediate_size"], num_hidden_layers=SETTINGS["num_hidden_layers"],
        num_attention_heads=SETTINGS["num_attention_heads"], num_key_value_heads=SETTINGS["num_key_value_heads"],
        max_position_embeddings=SETTINGS["max_position_embeddings"], rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)

    # Warm-up sequences: prose with BOS, dialogues through the chat template (ends with EOS).
    seqs = [tokenizer(p).input_ids for p in prose]
    seqs += [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                           tokenize=True, return_dict=True)["input_ids"] for q, a in dialogues]
    g = torch.Generator().manual_seed(SETTINGS["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"], weight_decay=0.0, betas=(0.9, 0.95))
    steps, bs = SETTINGS["warmup_steps"], SETTINGS["batch_size"]
    t0, model = time.time(), model.train()
    for step in range(steps):
        lr = SETTINGS["lr"] * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = [seqs[i] for i in torch.randint(len(seqs), (bs,), generator=g).tolist()]
        width = max(map(len, batch))
        ids = torch.full((bs, width), tokenizer.pad_token_id)
        mask = torch.zeros((bs, width), dtype=torch.long)
        for row, s in enumerate(batch):
            ids[row, :len(s)], mask[row, :len(s)] = torch.tensor(s), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"  tiny warm-up step {step:4d}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f}s")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    log(f"  tiny weights digest {weights_digest(out)} (to compare builds between machines; torch capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread)")
    return out


if __name__ == "__main__":  # python -m app.tiny OUT: the pinned build (ensure_model runs it)
    build_tiny_model(Path(sys.argv[1]))
