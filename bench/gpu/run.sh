#!/usr/bin/env bash
# One command on the offline GPU machine: install bench/gpu/wheels/ (bundle.sh) into a venv that sees the
# machine's torch, run gpu-check, then the GPU speed benchmark; every result lands in OUT_DIR.
#
#   bash bench/gpu/run.sh OUT_DIR              # on the GPU machine: at most ~8 minutes
#   bash bench/gpu/run.sh OUT_DIR --dry-run    # here, on the CPU: the current .venv, gpu-check --dry-run
#   .venv/bin/python bench/gpu/record.py OUT_DIR   # then, back here: the GPU section of BENCHMARKS.md
#
# OUT_DIR gets: run.log (everything printed), checks.txt (CUDA, versions and libraries checked before any
# run), gpu-check.json (the report), pip-freeze.txt (the versions it ran with), run-train.json, run-metrics.jsonl and run-smoke.json (the check's run folder), and
# dpo_speed.log when the speed benchmark ran; gpu-check-with-xformers.json when Unsloth's import broke with
# the bundled xformers and the check ran again without it. Environment: PYTHON (the interpreter holding torch; default
# python3), VENV (default /tmp/prefalign-gpu-venv), DPO_SPEED_ARGS (bench/dpo_speed.py's arguments, to run
# it whatever its --help offers), BUDGET (seconds for everything, default 480: each step gets what is left,
# and what did not fit is printed as skipped).
set -uo pipefail  # no -e: each step reports its own failure and the next one still runs
cd "$(dirname "$0")/../.."
ROOT=$PWD

OUT_DIR="" DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) OUT_DIR=$arg ;;
  esac
done
[ -n "$OUT_DIR" ] || { echo "usage: bash bench/gpu/run.sh OUT_DIR [--dry-run]" >&2; exit 2; }
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
exec > >(tee "$OUT_DIR/run.log") 2>&1
START=$SECONDS
BUDGET=${BUDGET:-480}  # seconds for the whole run: a device command has 600, and the machine's start is not in them
stamp() { echo; echo "== [$((SECONDS - START))s] $*"; }
left() { echo $((BUDGET - (SECONDS - START))); }
SKIPPED=()

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WHEELS=bench/gpu/wheels

stamp "machine: $(uname -srm), $(nproc) CPUs, $(date -u '+%Y-%m-%d %H:%M UTC')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ "$DRY" = 1 ]; then
  PY=$ROOT/.venv/bin/python
  stamp "dry run: the current environment ($PY), no install"
else
  BASE=${PYTHON:-python3}
  VENV=${VENV:-/tmp/prefalign-gpu-venv}
  stamp "venv $VENV from $BASE ($("$BASE" --version 2>&1)), --system-site-packages"
  [ -d "$WHEELS" ] || { echo "run.sh: no $WHEELS: run bench/gpu/bundle.sh first (and carry the folder)"; exit 2; }
  rm -rf "$VENV"
  "$BASE" -m venv --system-site-packages "$VENV" || { echo "run.sh: could not create the venv"; exit 2; }
  PY=$VENV/bin/python
  # A venv made from a venv (the GPU machine's python3 is one) sees the *base* interpreter's site-packages,
  # not the packages of the venv it was made from (torch...): add those, after the new venv's own.
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$BASE" -c 'import site; print("\n".join(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()))' \
    > "$SITE/_prefalign_base_site.pth"
  # only the wheels this Python can install: a llama-cpp-python built for another Python is left out, and
  # gpu-check then reports llama.cpp missing (training and merge still run)
  mapfile -t INSTALL < <("$PY" - "$WHEELS" <<'PYTHON'
import sys
from pathlib import Path
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
here = set(sys_tags())
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    if parse_wheel_filename(whl.name)[3] & here:
        print(whl)
    else:
        print(f"run.sh: skipped {whl.name}: not installable on this Python/platform", file=sys.stderr)
PYTHON
)
  echo "installing ${#INSTALL[@]} wheels (--no-index --no-deps --ignore-installed: the bundle wins over what the machine has)"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --ignore-installed "${INSTALL[@]}" \
    || { echo "run.sh: pip could not install the bundle"; exit 2; }
  # the machine's own torch 2.11 and friends, not requirements.txt's CPU pins: preflight lists them instead
  export PREFALIGN_ALLOW_UNPINNED=1
fi
"$PY" -m pip list --format=freeze --disable-pip-version-check > "$OUT_DIR/pip-freeze.txt" 2>/dev/null

stamp "checks: torch's CUDA against bitsandbytes' libraries, every bundled wheel's version specifiers, libgomp"
"$PY" - "$WHEELS" "$DRY" <<'PYTHON' | tee "$OUT_DIR/checks.txt"
"""What would break after minutes of work, said now: bitsandbytes carries CUDA libraries for some CUDA versions
only; a requirement can be present in the wrong version; llama.cpp's CPU library needs the system's libgomp."""
import ctypes.util, importlib.metadata, sys, zipfile
from pathlib import Path

sys.path.insert(0, "bench/gpu")
from packaging.utils import canonicalize_name
from wheel_requires import bundled, requirements

wheels, dry = Path(sys.argv[1]), sys.argv[2] == "1"
bundle = bundled(wheels)
problems = []
import torch
cuda = torch.version.cuda
bnb = bundle.get("bitsandbytes")
if bnb and cuda and not dry:
    libs = sorted(n.rsplit("/", 1)[-1] for n in zipfile.ZipFile(bnb[1]).namelist() if "libbitsandbytes_cuda" in n)
    if f"libbitsandbytes_cuda{cuda.replace('.', '')}.so" not in libs:
        problems.append(f"torch is built for CUDA {cuda} but the bundled bitsandbytes carries only {', '.join(libs)}: "
                        f"4-bit loading will fail; bundle.sh's KEEP_BNB must keep that CUDA's library")
for name, (version, whl) in bundle.items():
    for req in requirements(whl, {}):
        dep = canonicalize_name(req.name)
        try:
            have = bundle[dep][0] if dep in bundle else importlib.metadata.version(dep)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None:
            problems.append(f"{name} {version} needs {req}, which is neither in the bundle nor on this machine")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{name} {version} needs {req}; {have} is here")
if not ctypes.util.find_library("gomp"):
    problems.append("libgomp.so.1 (OpenMP) is not on this machine: llama.cpp's CPU library will not load")
print("\n".join(f"   {p}" for p in problems) if problems else "   none found")
PYTHON
"$PY" -c 'import torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) from {torch.__file__}; cuda available: {torch.cuda.is_available()}")'

# llama.cpp's converter and the Llama-3 vocabulary: .llamacpp/ is git-ignored, so it comes in the bundle
TARBALL=$(ls "$WHEELS"/llamacpp-converter-*.tar.gz 2>/dev/null | head -1)
if [ ! -f .llamacpp/VERSION ] || [ ! -f .llamacpp/models/ggml-vocab-llama-bpe.gguf ]; then
  if [ -n "$TARBALL" ]; then
    mkdir -p .llamacpp && tar -xzf "$TARBALL" -C .llamacpp && echo ".llamacpp/ unpacked from $TARBALL"
  else
    echo "run.sh: no .llamacpp/ and no converter tarball in $WHEELS: gpu-check cannot build its model"
  fi
fi

stamp "gpu-check$([ "$DRY" = 1 ] && echo ' --dry-run')"
rm -rf .cache/gpu-check/last-run  # a failed check must not leave the last one's files to be copied
CHECK_TIMEOUT=$(( $(left) - 90 < 360 ? $(left) - 90 : 360 ))  # leave the speed benchmark a minute and a half
"$PY" -m app gpu-check $([ "$DRY" = 1 ] && echo --dry-run) --out "$OUT_DIR/gpu-check.json" --timeout "$CHECK_TIMEOUT"
CHECK=$?
# xformers built for another torch should only make Unsloth fall back to SDPA; if Unsloth's import itself broke
# with it installed, check again without it (the first report is kept as gpu-check-with-xformers.json)
if [ "$CHECK" != 0 ] && [ "$DRY" = 0 ] && "$PY" -m pip show -q xformers >/dev/null 2>&1 && "$PY" - "$OUT_DIR/gpu-check.json" <<'PYTHON'
import json, sys
from pathlib import Path
p = Path(sys.argv[1])
sys.exit(0 if not p.is_file() or json.loads(p.read_text()).get("unsloth_import", "ok") != "ok" else 1)
PYTHON
then
  stamp "Unsloth did not import with xformers installed: gpu-check again without it"
  [ -f "$OUT_DIR/gpu-check.json" ] && mv "$OUT_DIR/gpu-check.json" "$OUT_DIR/gpu-check-with-xformers.json"
  "$PY" -m pip uninstall -y -q xformers
  if [ "$(left)" -gt 150 ]; then
    "$PY" -m app gpu-check --out "$OUT_DIR/gpu-check.json" --timeout $(( $(left) - 30 ))
    CHECK=$?
  else
    SKIPPED+=("gpu-check without xformers: $(left) s left of the ${BUDGET} s budget")
  fi
fi
for f in train.json metrics.jsonl smoke.json; do
  [ -f .cache/gpu-check/last-run/$f ] && cp .cache/gpu-check/last-run/$f "$OUT_DIR/run-$f"
done

stamp "dpo_speed: the app's path against plain TRL + PEFT + bitsandbytes"
SPEED_ARGS=${DPO_SPEED_ARGS:-}
if [ -z "$SPEED_ARGS" ] && [ "$DRY" = 0 ]; then
  if "$PY" bench/dpo_speed.py --help 2>/dev/null | grep -q -- "--layers"; then
    SPEED_ARGS="--shape llama3-8b --layers 4 --max-length 1024 --rounds 1"
  else
    echo "skipped: bench/dpo_speed.py cannot cut a shape's layers (no --layers), and the full 32-layer" \
         "Llama-3-8B does not fit this run's time (TODO in bench/gpu/README.md)"
  fi
elif [ -z "$SPEED_ARGS" ]; then
  echo "skipped in a dry run (DPO_SPEED_ARGS='--shape tiny --rounds 1' runs it)"
fi
if [ -n "$SPEED_ARGS" ] && [ "$(left)" -lt 90 ]; then
  SKIPPED+=("dpo_speed: $(left) s left of the ${BUDGET} s budget")
elif [ -n "$SPEED_ARGS" ]; then
  SPEED_TIMEOUT=$(( $(left) - 20 < 300 ? $(left) - 20 : 300 ))
  echo "\$ python bench/dpo_speed.py $SPEED_ARGS --no-record   (timeout ${SPEED_TIMEOUT}s)"
  # shellcheck disable=SC2086
  timeout "$SPEED_TIMEOUT" "$PY" bench/dpo_speed.py $SPEED_ARGS --no-record 2>&1 | tee "$OUT_DIR/dpo_speed.log"
  echo "dpo_speed exit status: ${PIPESTATUS[0]}"
fi

stamp "done in $((SECONDS - START))s; gpu-check exit status $CHECK"
"$PY" - "$OUT_DIR/gpu-check.json" <<'PYTHON'
import json, sys
from pathlib import Path
p = Path(sys.argv[1])
r = json.loads(p.read_text()) if p.is_file() else None
print("gpu-check: " + (f"{r['result']}" + (f": {r['reason']}" if r["reason"] else "") if r else "no report (see run.log)"))
PYTHON
ls -l "$OUT_DIR"
for skipped in "${SKIPPED[@]}"; do echo "skipped: $skipped"; done
[ "$(left)" -ge 0 ] || echo "run.sh: took over its ${BUDGET} s budget"
exit $CHECK
