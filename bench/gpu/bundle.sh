#!/usr/bin/env bash
# The offline GPU bundle: bench/gpu/wheels/ (git-ignored), built here from the package registry, for a GPU
# machine with no network that has Python 3.12 (x86-64), torch 2.11 (cu130), transformers 5.17, peft,
# accelerate, pyarrow, sentencepiece, tokenizers and the usual scientific stack, and none of the rest of the
# app's GPU path. bench/gpu/run.sh installs it there. See bench/gpu/README.md.
#
#   bash bench/gpu/bundle.sh            # ~1 minute; prints the bundle's size (at most 40 MiB, else it fails)
#   XFORMERS=0 bash bench/gpu/bundle.sh # without xformers (then gpu-check shows "xformers not installed")
#
# What it holds: the wheels the GPU path needs that the machine lacks, at requirements.txt's pins, compiled
# ones for CPython 3.12 on manylinux x86-64; unsloth repacked without studio/ (its 80 MB web app, which
# `import unsloth` never touches), bitsandbytes with only its CUDA 13.0 library and its CPU one (torch cu130
# loads libbitsandbytes_cuda130.so), the llama-cpp-python wheel `make setup` built (a CPU build) repacked
# without the duplicate library copies it carries, and llama.cpp's converter with the Llama-3 test vocabulary
# (.llamacpp/ subset) as a tarball. Then it checks, here: every wheel's requirements are in the bundle or on
# the GPU machine, and `import unsloth` works from the repacked wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=bench/gpu/wheels
LIMIT_MIB=40
XFORMERS=${XFORMERS:-1}
XFORMERS_VERSION=0.0.35  # unsloth's own pin for torch 2.11 + cu130 (its extra cu130onlytorch2110)

pin() {  # the requirements.txt version of a package (names compared as pip does: case, - and _ alike)
  local want; want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  while IFS= read -r line; do
    local name=${line%%==*}
    if [ "$(echo "$name" | tr 'A-Z_' 'a-z-')" = "$want" ]; then echo "$1==${line#*==}"; return; fi
  done < <(grep -E '^[A-Za-z0-9_.-]+==' requirements.txt)
  echo "bundle.sh: $1 is not pinned in requirements.txt" >&2; exit 1
}

# the GPU path's packages that the GPU machine lacks: the issue's list, and what their Requires-Dist adds
# (tyro: docstring_parser, typeguard; unsloth: json5, structlog, nest-asyncio, pydantic and its closure;
# llama-cpp-python: diskcache). Left out on purpose: hf_transfer (a downloader; the machine is offline),
# diffusers (image models), certifi (there already; unsloth's >=2026.10.19 is metadata only).
PACKAGES=(unsloth unsloth_zoo trl datasets bitsandbytes torchao tyro msgspec cut_cross_entropy dill multiprocess
          xxhash docstring_parser typeguard json5 structlog nest-asyncio pydantic pydantic_core annotated-types
          typing-inspection diskcache)
SPECS=()
for p in "${PACKAGES[@]}"; do SPECS+=("$(pin "$p")"); done
[ "$XFORMERS" = 1 ] && SPECS+=("xformers==$XFORMERS_VERSION")

TMP=$(mktemp -d /tmp/gpu-bundle.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== downloading ${#SPECS[@]} wheels for CPython 3.12, manylinux x86-64 (pure-Python ones as they are)"
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" --platform manylinux2014_x86_64 -d "$TMP/dl" "${SPECS[@]}" \
  2> >(grep -v "^WARNING: Location" >&2)
mv "$TMP"/dl/*.whl "$OUT"/

echo "== the llama-cpp-python wheel that make setup built"
LLAMA=$(ls -t "$HOME"/.cache/prefalign/llama-cpp-wheels/*/llama_cpp_python-*.whl 2>/dev/null | head -1 || true)
if [ -n "$LLAMA" ]; then
  cp "$LLAMA" "$OUT"/
  echo "   $LLAMA"
else
  echo "   none under ~/.cache/prefalign/llama-cpp-wheels/ (run make setup): the bundle has no llama.cpp;" \
       "gpu-check will report it missing and skip GGUF export and smoke"
fi

echo "== repacking"
"$PY" - "$OUT" <<'PYTHON'
"""Repack = unzip, delete, fix RECORD (drop the deleted entries, re-hash what changed), zip again under the
same name."""
import base64, hashlib, re, sys, zipfile
from pathlib import Path

out = Path(sys.argv[1])


def repack(path: Path, drop, rewrite=None):
    rewrite = rewrite or {}
    before = path.stat().st_size
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        kept, changed = [], {}
        for info in zin.infolist():
            if info.filename == record or drop(info.filename):
                continue
            data = zin.read(info)
            if info.filename in rewrite:
                data = changed[info.filename] = rewrite[info.filename](data)
            info.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(info, data, compresslevel=9)
            kept.append(info.filename)
        keep = set(kept)
        rows = []
        for line in zin.read(record).decode().splitlines():
            name = line.split(",")[0]
            if name in changed:
                digest = base64.urlsafe_b64encode(hashlib.sha256(changed[name]).digest()).rstrip(b"=").decode()
                rows.append(f"{name},sha256={digest},{len(changed[name])}")
            elif name in keep:
                rows.append(line)
        rows.append(f"{record},,")
        zout.writestr(zin.getinfo(record), "\n".join(rows) + "\n", compresslevel=9)
        dropped = len(zin.infolist()) - len(kept) - 1
    tmp.replace(path)
    print(f"   {path.name}: {before / 2**20:.1f} -> {path.stat().st_size / 2**20:.1f} MiB ({dropped} files left out)")


def top_level_without(*names):
    return lambda data: "".join(f"{n}\n" for n in data.decode().split() if n not in names).encode()


for whl in out.glob("unsloth-*.whl"):  # not unsloth_zoo
    info = next(n for n in zipfile.ZipFile(whl).namelist() if n.endswith(".dist-info/top_level.txt"))
    repack(whl, lambda n: n.startswith("studio/"), {info: top_level_without("studio")})

KEEP_BNB = {"bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so"}
for whl in out.glob("bitsandbytes-*.whl"):
    repack(whl, lambda n: re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", n) is not None and n not in KEEP_BNB)

# llama-cpp-python: ctypes loads llama_cpp/lib/libllama.so and libggml.so by these names; they need the
# libggml*.so.0 sonames (readelf NEEDED). The top-level lib/ and include/ (installed beside site-packages'
# packages, unused) and the version-suffixed copies are duplicates.
KEEP_LLAMA = {"llama_cpp/lib/libllama.so", "llama_cpp/lib/libggml.so", "llama_cpp/lib/libggml.so.0",
              "llama_cpp/lib/libggml-base.so.0", "llama_cpp/lib/libggml-cpu.so.0"}
for whl in out.glob("llama_cpp_python-*.whl"):
    names = zipfile.ZipFile(whl).namelist()
    cuda = any("ggml-cuda" in n for n in names)
    KEEP_LLAMA |= {n for n in names if n.startswith("llama_cpp/lib/libggml-cuda.so")} if cuda else set()
    repack(whl, lambda n: n.startswith(("lib/", "include/", "bin/"))
           or (n.startswith("llama_cpp/lib/") and ".so" in n and n not in KEEP_LLAMA))
PYTHON

echo "== llama.cpp's converter and the Llama-3 test vocabulary (.llamacpp/ subset)"
if [ -f .llamacpp/VERSION ] && [ -f .llamacpp/models/ggml-vocab-llama-bpe.gguf ]; then
  tar -czf "$OUT/llamacpp-converter-$(cat .llamacpp/VERSION).tar.gz" -C .llamacpp \
    convert_hf_to_gguf.py conversion gguf-py VERSION LICENSE models/ggml-vocab-llama-bpe.gguf
else
  echo "bundle.sh: .llamacpp/ has no converter or vocabulary; run make setup first" >&2; exit 1
fi

echo "== checks"
"$PY" - "$OUT" "$XFORMERS" <<'PYTHON'
"""Every requirement of every bundled wheel (Python 3.12, Linux x86-64, no extras) is in the bundle or on the
GPU machine; the llama-cpp-python wheel's tags and build."""
import sys, zipfile
from pathlib import Path

sys.path.insert(0, "bench/gpu")
from packaging.utils import canonicalize_name, parse_wheel_filename
from wheel_requires import bundled, requirements

out, xformers = Path(sys.argv[1]), sys.argv[2] == "1"
# the GPU machine's packages that the bundle relies on (its image's package list, 2026-11)
GPU_HAS = """accelerate aiohttp certifi click einops filelock fsspec httpx huggingface-hub jinja2 matplotlib numpy
packaging pandas peft pillow protobuf psutil pyarrow pyyaml regex requests rich safetensors sentencepiece setuptools
tokenizers torch torchvision tqdm transformers triton typer typing-extensions wheel xxhash""".split()
LEFT_OUT = {"hf-transfer": "a downloader; the machine is offline", "diffusers": "image models only",
            **({} if xformers else {"xformers": "XFORMERS=0"})}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix"}
wheels = bundled(out)
have = set(wheels) | {canonicalize_name(n) for n in GPU_HAS}
missing, skipped = [], set()
for name, (_, whl) in wheels.items():
    for req in requirements(whl, env):
        dep = canonicalize_name(req.name)
        if dep in LEFT_OUT:
            skipped.add(f"{dep} ({LEFT_OUT[dep]})")
        elif dep not in have:
            missing.append(f"{name} needs {req}")
print(f"   requirements: every one is in the bundle or on the GPU machine" if not missing else
      "   MISSING on the GPU machine:\n     " + "\n     ".join(missing))
if skipped:
    print("   left out on purpose: " + ", ".join(sorted(skipped)))
for whl in out.glob("llama_cpp_python-*.whl"):
    _, _, _, tags = parse_wheel_filename(whl.name)
    tag = sorted(str(t) for t in tags)[0]
    names = zipfile.ZipFile(whl).namelist()
    build = "a CUDA build" if any("ggml-cuda" in n for n in names) else "a CPU build (no libggml-cuda: llama.cpp will not offload to the GPU)"
    py3 = all(t.interpreter.startswith("py3") and t.abi == "none" for t in tags)
    print(f"   {whl.name}: {build}; tag {tag}: " + (
        "ctypes bindings with no Python extension module, so pip installs it on Python 3.12 as well" if py3 else
        f"built for {tag.split('-')[0]}: it will NOT install on the GPU machine's Python 3.12 (run.sh skips it "
        "and gpu-check reports llama.cpp missing); build one there or a py3 one here"))
sys.exit(1 if missing else 0)
PYTHON

echo "== import check: unsloth from the repacked wheels (this Python: the wheels it can load, PYTHONPATH first)"
"$PY" - "$OUT" "$TMP/site" <<'PYTHON'
import subprocess, sys
from pathlib import Path

from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

out, site = Path(sys.argv[1]), sys.argv[2]
here = set(sys_tags())
usable = [w for w in sorted(out.glob("*.whl")) if parse_wheel_filename(w.name)[3] & here
          and not w.name.startswith("xformers-")]  # xformers needs its own torch build: the GPU's business
skipped = sorted(w.name for w in out.glob("*.whl") if w not in usable)
subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
                "--no-deps", "--no-compile", "--target", site, *map(str, usable)], check=True)
print(f"   installed {len(usable)} wheels into a temporary folder; not loadable by Python "
      f"{sys.version_info.major}.{sys.version_info.minor} here: {', '.join(skipped) or 'none'}")
PYTHON
PYTHONPATH="$TMP/site" HF_HUB_OFFLINE=1 "$PY" - "$TMP/site" <<'PYTHON' 2>&1 | grep -v "kernels-community\|Unsloth Zoo will now patch\|no GPU found\|_pytree.py\|n_ctx_train"
import logging, os, sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import unsloth  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402,F401
import bitsandbytes, unsloth_zoo, trl  # noqa: E402,E401
bad = [m.__name__ for m in (unsloth, unsloth_zoo, bitsandbytes, trl) if site not in Path(m.__file__).resolve().parents]
assert not bad, f"imported from outside the bundle: {bad}"
assert not (site / "studio").exists(), "studio/ is still in the unsloth wheel"
libs = sorted(p.name for p in (site / "bitsandbytes").glob("*.so"))
print(f"   import unsloth {unsloth.__version__} + FastLanguageModel, unsloth_zoo {unsloth_zoo.__version__}, "
      f"trl {trl.__version__}, bitsandbytes {bitsandbytes.__version__} ({', '.join(libs)}): from the bundle, OK")
import llama_cpp  # noqa: E402
if site in Path(llama_cpp.__file__).resolve().parents:
    vocab = Path(".llamacpp/models/ggml-vocab-llama-bpe.gguf")
    llm = llama_cpp.Llama(model_path=str(vocab), vocab_only=True, verbose=False)
    ids = llm.tokenize(b"Hello world", add_bos=False)
    llm.close()  # not at interpreter exit, where llama-cpp-python's __del__ finds its bindings gone
    print(f"   llama_cpp {llama_cpp.__version__} from the repacked wheel: loads the Llama-3 vocabulary, tokenizes "
          f"'Hello world' as {ids}; llama_supports_gpu_offload() = {llama_cpp.llama_supports_gpu_offload()}")
PYTHON
[ "${PIPESTATUS[0]}" = 0 ] || { echo "bundle.sh: the import check failed" >&2; exit 1; }

echo "== the bundle: $OUT"
ls -l "$OUT" | awk 'NR > 1 {printf "   %8.2f MiB  %s\n", $5 / 1048576, $9}'
BYTES=$(du -cb "$OUT"/* | tail -1 | cut -f1)
MIB=$(awk -v b="$BYTES" 'BEGIN {printf "%.1f", b / 1048576}')
echo "   total: $MIB MiB in $(ls "$OUT" | wc -l) files (limit $LIMIT_MIB MiB)"
if awk -v b="$BYTES" -v l="$LIMIT_MIB" 'BEGIN {exit !(b > l * 1048576)}'; then
  echo "bundle.sh: FAILED: the bundle is $MIB MiB, over the $LIMIT_MIB MiB limit" >&2
  exit 1
fi
echo "   it travels with the code: git-ignored, so name bench/gpu/wheels in the device run's carry"
