#!/usr/bin/env bash
# One command on the offline GPU machine: install bench/gpu/wheels/ (bundle.sh) into a venv that sees the
# machine's torch, run gpu-check, then the GPU speed benchmark; every result lands in OUT_DIR.
#
#   bash bench/gpu/run.sh OUT_DIR              # on the GPU machine: at most ~8 minutes
#   bash bench/gpu/run.sh OUT_DIR --dry-run    # here, on the CPU: the current .venv, gpu-check --dry-run
#   .venv/bin/python bench/gpu/record.py OUT_DIR   # then, back here: the GPU section of BENCHMARKS.md
#
# OUT_DIR gets: run.log (everything printed), gpu-check.json (the report), pip-freeze.txt (the versions
# it ran with), run-train.json, run-metrics.jsonl and run-smoke.json (the check's run folder), and
# dpo_speed.log when the speed benchmark ran; gpu-check-with-xformers.json when Unsloth's import broke with
# the bundled xformers and the check ran again without it. Environment: PYTHON (the interpreter holding torch; default
# python3), VENV (default /tmp/prefalign-gpu-venv), DPO_SPEED_ARGS (bench/dpo_speed.py's arguments, to run
# it whatever its --help offers).
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
stamp() { echo; echo "== [$((SECONDS - START))s] $*"; }

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
"$PY" -m app.gpucheck $([ "$DRY" = 1 ] && echo --dry-run) --out "$OUT_DIR/gpu-check.json" --timeout 360
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
  "$PY" -m app.gpucheck --out "$OUT_DIR/gpu-check.json" --timeout 360
  CHECK=$?
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
if [ -n "$SPEED_ARGS" ]; then
  echo "\$ python bench/dpo_speed.py $SPEED_ARGS --no-record"
  # shellcheck disable=SC2086
  timeout 300 "$PY" bench/dpo_speed.py $SPEED_ARGS --no-record 2>&1 | tee "$OUT_DIR/dpo_speed.log"
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
[ $((SECONDS - START)) -le 480 ] || echo "run.sh: took over 8 minutes"
exit $CHECK
