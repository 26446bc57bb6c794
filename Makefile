# Thin wrappers over `python -m app ...`; every target sets itself up on first use.
#   make dpo [MODEL=tiny] [STEPS=N] [SET="dpo.beta=0.2 lora.r=8"]   train, export, smoke-test
#   make dpo RESUME=exports/<run>                                    continue an interrupted run
#   make dpo GPUS=N                                                  train in N processes (accelerate launch, DDP)
#   make dpo FIT=1  |  make preflight [MODEL=...] [FIT=1]           the batch that fits the GPU / the checks alone
#   make sft|orpo|kto|reward|grpo|rloo [MODEL=tiny] [STEPS=N]        the other methods (reward: no export)
#   make export|smoke|chat|report [RUN=exports/<run>] [QUANT=q4_k_m]
#   make compare [RUN=exports/<run>] [QUANT=q4_k_m] [PROMPTS=file]   base vs aligned replies, side by side
#   make eval [RUN=exports/<run>] [TASKS=t1,t2] [LIMIT=N] [GGUF=q8_0] lm-eval benchmarks, base against trained
#   make serve [RUN=exports/<run>] [QUANT=q4_k_m] [PORT=8000]        OpenAI-compatible server on 127.0.0.1
#   make ui [PORT=8765]                                              the web app on 127.0.0.1: label, train, runs, compare, chat
#   make gpu-check [DRY=1]                                           the GPU path in minutes (exit 2 without a GPU)
#   make runs | bench | test | test-fast | clean                     test-fast: what trains nothing, in a minute
#   make setup [EXTRAS="tensorboard trackio"]                       the pins; EXTRAS: optional trackers too
MODEL ?= tiny
RUN ?= latest
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# GPU=1: llama.cpp built with CUDA. The first setup chooses it by itself where nvidia-smi lists a GPU and nvcc is
# installed; after that the choice is remembered (.venv/.gpu), and `make setup GPU=1` (or GPU=0) changes it
GPU ?= $(shell cat $(VENV)/.gpu 2>/dev/null || ({ command -v nvcc && nvidia-smi -L | grep -q GPU; } >/dev/null 2>&1 && echo 1))
# llama-cpp-python compiles llama.cpp from source (~12 minutes on 2 cores). Portable x86-64-v3 flags, not
# -march=native: the native build's AVX512/AMX kernels crashed on quantized GGUFs on our CI machines, and a
# portable wheel can be reused on another CPU. The tools and examples are not needed (halves the build).
# GPU=1 builds it with CUDA for GPU inference (needs the CUDA toolkit).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF
# CUDA_ARCH: the GPU architectures to compile for; "native" (the GPU of this machine, CMake >= 3.24) instead of
# CUDA's every-architecture default, which takes far longer or falls back to a slow PTX JIT at run time
CUDA_ARCH ?= native
ifeq ($(GPU),1)
LLAMA_CMAKE_ARGS += -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH)
GPU_NOTE := @echo "GPU=1: llama.cpp built with CUDA; bitsandbytes' wheel carries its CUDA libraries; no xformers: none is built for torch 2.13 (0.0.35 is for torch 2.10), so Unsloth uses PyTorch's SDPA. Next: make gpu-check"
else
GPU_NOTE := @:
endif
# pip's own wheel cache ignores CMAKE_ARGS (it would hand a CPU build to GPU=1), so built wheels are kept
# per set of flags here.
LLAMA_BUILD := $(shell echo '$(LLAMA_CMAKE_ARGS)' | sha1sum | cut -c1-12)
LLAMA_WHEELS := $(HOME)/.cache/prefalign/llama-cpp-wheels/$(LLAMA_BUILD)
# the setup stamp names the llama.cpp build too: `make setup GPU=1` after a CPU setup installs the CUDA build
READY := $(VENV)/.ready-$(LLAMA_BUILD)

# the training methods, one target each: the names of app/methods.py's table
METHODS := $(shell sed -n 's/^    Method."\([a-z0-9_]*\)".*/\1/p' app/methods.py)
NOT_OFFERED := $(shell sed -n 's/^    "\([a-z0-9_]*\)": .*/\1/p' app/methods.py)

.PHONY: setup gpu-check $(METHODS) $(NOT_OFFERED) preflight export smoke chat compare eval serve ui report runs recipes bench test test-fast clean

setup: $(READY) $(foreach e,$(EXTRAS),$(VENV)/.extra-$(e))

# requirements.txt pins every package; it is installed with --no-deps because unsloth's metadata asks for a
# certifi newer than the registry serves (FIELD-NOTES). torch goes first, with its own dependencies, so a
# GPU machine gets the CUDA libraries that belong to it (here: the local CPU wheel).
$(READY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$$(grep '^torch==' requirements.txt)"
	@ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || { echo "building llama-cpp-python (~12 minutes, once)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(VENV)/bin/pip wheel --quiet --no-deps --no-cache-dir \
	    "$$(grep '^llama_cpp_python==' requirements.txt)" -w $(LLAMA_WHEELS).tmp && mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); }
	$(VENV)/bin/pip install --quiet --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl
	$(VENV)/bin/pip install --quiet --no-deps -r requirements.txt
	$(PY) -m app setup
	$(GPU_NOTE)
	rm -f $(VENV)/.ready-* && echo '$(GPU)' > $(VENV)/.gpu && touch $@

# an optional extra: the lines of requirements-extras.txt tagged `# NAME`, with --no-deps as the core
$(VENV)/.extra-%: requirements-extras.txt $(READY)
	@grep -Eq '^[^#]+# *$*$$' requirements-extras.txt || { echo "no extra '$*' in requirements-extras.txt"; exit 2; }
	$(VENV)/bin/pip install --quiet --no-deps $$(grep -E '^[^#]+# *$*$$' requirements-extras.txt | cut -d' ' -f1)
	touch $@

# one target per method; a recipe whose stages end with it runs them all (make dpo MODEL=tiny-sft-dpo)
$(METHODS): $(READY)
	$(PY) -m app $@ $(MODEL) $(if $(STEPS),--set $@.max_steps=$(STEPS)) $(foreach s,$(SET),--set $(s)) \
	  $(if $(FIT),--set model.auto_fit=true) $(if $(RESUME),--resume $(RESUME)) $(if $(GPUS),--processes $(GPUS))

# a method asked for that is not offered: the app says why in one sentence (app/methods.py NOT_OFFERED)
$(NOT_OFFERED): $(READY)
	@$(PY) -m app $@

# versions, converter, tokenizer, data, disk, GPU memory in seconds (dpo runs the same checks first)
preflight: $(READY)
	$(PY) -m app preflight --recipe $(MODEL) $(foreach s,$(SET),--set $(s)) $(if $(FIT),--set model.auto_fit=true)

# 4-bit load, LoRA, 10 DPO steps, merge, GGUF f16 + q4_k_m, smoke on a tiny random Llama-3-shaped model;
# DRY=1 runs the same path on the CPU
gpu-check: $(READY)
	$(PY) -m app gpu-check $(if $(DRY),--dry-run)

export: $(READY)
	$(PY) -m app export $(RUN)

smoke: $(READY)
	$(PY) -m app smoke $(RUN)

chat: $(READY)
	$(PY) -m app chat $(RUN) $(if $(QUANT),--quant $(QUANT))

compare: $(READY)
	$(PY) -m app compare $(RUN) $(if $(QUANT),--quant $(QUANT)) $(if $(PROMPTS),--prompts $(PROMPTS))

# lm-eval on the merged model and its base (GGUF: also the GGUF, generation tasks only); eval.json, report.md
eval: $(READY)
	$(PY) -m app eval $(RUN) $(if $(TASKS),--tasks $(TASKS)) $(if $(LIMIT),--limit $(LIMIT)) $(if $(GGUF),--gguf $(GGUF))

serve: $(READY)
	$(PY) -m app serve $(RUN) $(if $(QUANT),--quant $(QUANT)) $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST))

# the web app: label pairs, train on them, runs, compare, chat; open the printed address (it holds the token)
ui: $(READY)
	$(PY) -m app ui $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST))

report: $(READY)
	$(PY) -m app report $(RUN)

runs: $(READY)
	$(PY) -m app runs

recipes: $(READY)
	$(PY) -m app recipes

# figures, not tests: each script appends a section to BENCHMARKS.md
bench: $(READY)
	$(PY) bench/export_cost.py
	$(PY) bench/offline_default.py
	$(PY) bench/dpo_speed.py --shape $(or $(SHAPE),tiny)   # on a GPU: make bench SHAPE=llama-1b

# with the tensorboard extra, so that its test (a short run writing event files) runs here and in CI, and with
# Chromium for the web app's browser test
test: $(READY) $(VENV)/.extra-tensorboard $(VENV)/.chromium
	$(PY) -m pytest -q --durations=25 tests

# Debian's Chromium and its driver for tests/test_ui_browser.py (Selenium); apt-get only where they are missing
# (about 10 s on a Debian 12 mirror), as root or with sudo
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)
$(VENV)/.chromium: $(READY)
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { $(SUDO) apt-get update -qq \
	  && $(SUDO) apt-get install -y --no-install-recommends chromium chromium-driver; }
	touch $@

# the fast tier: every test that trains and exports nothing (verdicts, recipes, planner, bad inputs), in a minute
test-fast: $(READY)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .cache .llamacpp .pytest_cache unsloth_compiled_cache
	find exports -mindepth 1 -maxdepth 1 ! -name README.md ! -name labels -exec rm -rf {} +  # labels: a person's work
