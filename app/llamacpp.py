"""Where llama.cpp's HF-to-GGUF converter lives, how it gets there, and how it is called.

The converter must be of the same llama.cpp commit as the runtime that will load the GGUF, so it is
taken from the source distribution of the very llama-cpp-python version that is installed (its
vendor/llama.cpp/ holds convert_hf_to_gguf.py, the conversion/ package and gguf-py/). `make setup`
fetches it once from the package registry into .llamacpp/ (ignored by git); export never downloads.
The same archive carries llama.cpp's tokenizer test vocabularies (models/ggml-vocab-*.gguf), which the
tests use to build real Llama 3 and Qwen2 tokenizers offline.
"""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from app import ROOT, AppError

HOME = ROOT / ".llamacpp"
CONVERTER = HOME / "convert_hf_to_gguf.py"
VOCABS = HOME / "models"
WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-", "LICENSE")


def runtime_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise AppError("llama-cpp-python is not installed; run `make setup`") from None


def converter_version(home: Path = HOME) -> str | None:
    stamp = home / "VERSION"
    return stamp.read_text().strip() if stamp.exists() and (home / CONVERTER.name).exists() else None


def check_converter(home: Path = HOME):
    """AppError unless the converter (script, conversion/ and gguf-py/) is in `home` and of the runtime's
    release, so that its GGUF files load in the runtime."""
    missing = [name for name in (CONVERTER.name, "conversion", "gguf-py", "VERSION") if not (home / name).exists()]
    if missing:
        raise AppError(f"llama.cpp's converter is missing from {home} (no {missing[0]}), so export could not make "
                       f"a GGUF; fix: `make setup` (or `python -m app setup`) unpacks it")
    have, want = converter_version(home), runtime_version()
    if have != want:
        raise AppError(f"the llama.cpp converter in {home} is from llama-cpp-python {have} but {want} is installed, "
                       f"so its GGUF files may not load in the runtime; fix: `make setup` fetches the matching one")


class ConverterFailed(AppError):
    """The converter exited with an error; `tail` holds its last lines (e.g. an unknown BPE pre-tokenizer)."""

    def __init__(self, message: str, tail: list[str]):
        super().__init__(message)
        self.tail = tail


def fetch_converter():
    """Download the llama-cpp-python source distribution of the installed version; unpack the converter."""
    version = runtime_version()
    if converter_version() == version:
        print(f"llama.cpp converter {version} already in {HOME}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        staging = Path(tmp) / "out"
        with tarfile.open(archive) as tar:
            prefix = f"{archive.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
            members = []
            for m in tar.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if rel and rel.startswith(WANTED) and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            tar.extractall(staging, members=members, filter="data")
        (staging / "VERSION").write_text(version + "\n")
        shutil.rmtree(HOME, ignore_errors=True)
        shutil.move(str(staging), HOME)
    print(f"llama.cpp converter {version} unpacked in {HOME}")


def run_converter(model_dir: Path, outfile: Path, outtype: str | None = None, vocab_only: bool = False,
                  home: Path = HOME) -> str:
    """convert_hf_to_gguf.py MODEL --outfile OUT [--outtype TYPE] [--vocab-only] in a subprocess; returns
    its log. ConverterFailed with the converter's last lines when it fails."""
    check_converter(home)
    # the converter puts its own gguf-py (same commit) ahead of any installed gguf package by itself
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    options = (["--outtype", outtype] if outtype else []) + (["--vocab-only"] if vocab_only else [])
    proc = subprocess.run([sys.executable, str(home / CONVERTER.name), str(model_dir), "--outfile", str(outfile),
                           *options], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        outfile.unlink(missing_ok=True)
        tail = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()][-3:]
        from app.runs import disk_full
        full = disk_full(Exception(" ".join(tail)))
        if full:
            raise AppError(f"llama.cpp's converter could not write {outfile.name}: {full}; free some disk space "
                           f"and export again")
        raise ConverterFailed(f"llama.cpp's converter failed on {model_dir}: {' | '.join(tail)}", tail)
    return proc.stderr


def prepare_tokenizer_for_converter(model_dir: Path, base_source: str):
    """Two gaps between what transformers 5 saves and what llama.cpp's converter reads:
    - tokenizer.model: Unsloth's merged folder lacks the base's SentencePiece file, and the converter then
      guesses the vocabulary from tokenizer.json instead: copy it over when the base has one;
    - added_tokens_decoder: the converter learns which added tokens are special (chat markers) only from
      tokenizer_config.json, where transformers 5 no longer writes them; without it `<|user|>` becomes
      plain text in the GGUF and llama.cpp tokenizes the chat template differently. Restore it from
      tokenizer.json."""
    src = Path(base_source) / "tokenizer.model"
    if not src.is_file() and not Path(base_source).is_dir():
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(base_source, "tokenizer.model")
        src = Path(cached) if isinstance(cached, str) else src
    if src.is_file() and not (model_dir / "tokenizer.model").exists():
        shutil.copy2(src, model_dir / "tokenizer.model")

    config_path, tokenizer_json = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if config_path.is_file() and tokenizer_json.is_file():
        config = json.loads(config_path.read_text())
        if "added_tokens_decoder" not in config:
            added = json.loads(tokenizer_json.read_text()).get("added_tokens", [])
            config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def quantize(source: Path, out: Path, ftype: str) -> int:
    """llama.cpp's quantizer through the binding (no separate binary): `ftype` is a llama_cpp constant's name,
    e.g. LLAMA_FTYPE_MOSTLY_Q4_K_M. Returns llama_model_quantize's status (0: done)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = 0
    return llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)


def run_quantizer(source: Path, out: Path, ftype: str) -> bool:
    """quantize() in a child process, as the converter runs: the quantizer maps the whole source file and
    its buffers, which then never count against the exporting process's memory. True when it succeeded."""
    proc = subprocess.run([sys.executable, "-m", "app.llamacpp", "quantize", str(source), str(out), ftype],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        out.unlink(missing_ok=True)
    return proc.returncode == 0


if __name__ == "__main__":  # python -m app.llamacpp [quantize SOURCE OUT FTYPE]
    if sys.argv[1:2] == ["quantize"]:
        sys.exit(quantize(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]))
    fetch_converter()
