"""Preflight: checks that take seconds, before any model is loaded, so that a run stops now with one sentence
and its fix rather than after training. `python -m app preflight [--recipe R]`; `dpo` runs it first.

    versions    every pin in requirements.txt is the installed version (importlib.metadata)
    trackers    every experiment tracker a method section's report_to names (TRL's field) is installed
    converter   llama.cpp's convert_hf_to_gguf.py is in .llamacpp/ and was unpacked from the installed
                llama-cpp-python, i.e. the runtime's llama.cpp release (the VERSION that `make setup` records)
    model       app.model's file checks of a local folder (config.json, safetensors, tokenizer, template);
                with HF_HUB_OFFLINE set, a hub model must be in the cache (else training's own sentence)
    data        every row of a local data file is read and checked as training will (app.data), without
                building a dataset; a hub dataset must be in the cache when offline
    disk        exports/ has room for the checkpoints, the merged 16-bit weights and every requested GGUF
    tokenizer   llama.cpp's converter writes the vocabulary of the tokenizer saved as export saves it
                (--vocab-only: an unknown BPE pre-tokenizer fails here, not after training); llama.cpp
                loads it and tokenizes the chat prompt as transformers does (what the smoke test demands)
    template    the chat template renders a conversation and ends the reply with an end-of-turn token
    GPU memory  app.memory's estimate against the GPU's free memory; with model.auto_fit the batch that fits

The tokenizer, template and GPU checks need transformers and torch, so a child process does them
(app/preflight_child.py), started first, while this process does the rest. This process never imports
transformers: when training follows, Unsloth is still imported before it (Unsloth patches transformers on
import). Nothing here contacts the hub: the child runs with HF_HUB_OFFLINE=1 and the tokenizer checks
skip a model that is not local or cached.

The tokenizer and template results are kept in .cache/preflight/ under a hash of everything they read
(the model's non-weight files, the recipe's template settings, the converter's release, the tokenizing
libraries' versions, this code), so the next preflight of the same files needs no child at all on a
machine without a GPU device, and only torch's CUDA query on one with a GPU.

With model.auto_fit, run_preflight returns the fitted training fields (`Preflight.changes`) for the caller
to apply (app.memory.with_training_changes), so the training that follows and the run's saved recipe.yaml
use them; a run's own recipe (resume) is never refitted, because its checkpoint was made with its batch.
"""
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from app import ROOT, AppError, repo_path
from app import llamacpp
from app.memory import (CUDA_CONTEXT_GIB, GiB, architecture, estimate_training_memory, fit_to_memory, model_folder, parse_params,
                        reference_choices, train_setting, training_section, with_training_changes)
from app.methods import METHODS
from app.model import BUILT, built_model, is_path, local_folder, offline
from app.preflight_child import Probe, skipped

logger = logging.getLogger(__name__)

REQUIREMENTS = ROOT / "requirements.txt"
CACHE = ROOT / ".cache" / "preflight"  # tokenizer and template results, by a hash of everything they depend on
GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".pkl")
SKIPPED = {"tokenizer": skipped("tokenizer: skipped, the model is not on this machine yet"),
           "template": skipped("template: skipped, the model is not on this machine yet"), "cuda": None}


@dataclasses.dataclass
class Preflight:
    lines: list[str]  # the checks that passed (or were skipped), each "ok: ..."
    changes: dict     # training fields model.auto_fit chose, for the caller to apply; {} without auto_fit


def run_preflight(recipe, *, requirements: Path = REQUIREMENTS, llamacpp_home: Path = llamacpp.HOME,
                  cache: Path | None = CACHE, log=None) -> Preflight:
    """Every check in turn (each line also given to `log` as it comes); AppError with one sentence and the
    fix at the first that fails. `cache` keeps the tokenizer and template results of files already checked
    (None: check again); the child process then runs only to ask a GPU, if any."""
    t0 = time.monotonic()
    lines = []

    def ok(text):
        lines.append(f"ok: {text}")
        if log:
            log(lines[-1])

    arch, arch_source = architecture(recipe)
    folder = tokenizer_folder(recipe)  # None: not on this machine yet, so the tokenizer checks are skipped
    key = tokenizer_key(recipe, folder, llamacpp_home) if folder and cache else None
    cached = read_cached(cache, key)
    check_tokenizer = folder is not None and not cached
    gpu_here = any(Path(p).exists() for p in GPU_DEVICES)  # without one, torch cannot see a GPU: no need to ask it
    probe = Probe(recipe, folder if check_tokenizer else None, llamacpp_home) if check_tokenizer or gpu_here else None
    try:
        ok(check_versions(requirements))
        ok(check_trackers(recipe))
        ok(check_converter(llamacpp_home))
        ok(check_model_source(recipe, folder))
        text, train_rows = check_data(recipe)
        ok(text)
        ok(check_disk(recipe, arch, train_rows))
        ok(check_evaluation_cost(recipe, train_rows))
        result = {**SKIPPED, **(probe.result() if probe else {}), **(cached or {})}
        for check in ("tokenizer", "template"):  # in this order: a tokenizer that fails to load fails both
            if result[check]["status"] == "failed":
                raise AppError(result[check]["text"])
            ok(result[check]["text"])
        if check_tokenizer and key:
            write_cached(cache, key, {k: result[k] for k in ("tokenizer", "template")})
        line, changes = check_gpu_memory(recipe, arch, arch_source, result["cuda"])
        ok(line)
        ok(check_after_training(recipe, arch, result["cuda"], llamacpp_gpu_offload()))
    finally:
        if probe:
            probe.stop()
    ok(f"preflight passed in {time.monotonic() - t0:.1f}s")
    return Preflight(lines, changes)


# --- checks in this process ------------------------------------------------------------------------------

def check_versions(requirements: Path = REQUIREMENTS) -> str:
    """The first installed version that does not satisfy its pin is an error (unless PREFALIGN_ALLOW_UNPINNED
    is set: a machine with its own torch build, say, then gets the mismatches listed instead)."""
    import importlib.metadata

    from packaging.requirements import InvalidRequirement, Requirement

    pins, wrong = 0, []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            raise AppError(f"{requirements.name}: '{line}' is not a requirement; fix: write it as name==version") from None
        if req.marker and not req.marker.evaluate():
            continue
        pins += 1
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            wrong.append((req, have))
    if wrong and not os.environ.get("PREFALIGN_ALLOW_UNPINNED"):
        req, have = wrong[0]
        state = f"{have} is installed" if have else "is not installed"
        raise AppError(f"{req.name} {state} but {requirements.name} pins {req.name}{req.specifier}"
                       + (f" ({len(wrong) - 1} more differ)" if len(wrong) > 1 else "")
                       + "; fix: `make setup` installs the pins (or set PREFALIGN_ALLOW_UNPINNED=1 to go on anyway)")
    if wrong:
        return (f"versions: {len(wrong)} of {pins} differ from {requirements.name}, allowed by PREFALIGN_ALLOW_UNPINNED: "
                + ", ".join(f"{r.name} {h or 'missing'} (pinned {r.specifier})" for r, h in wrong))
    return f"versions: all {pins} pins in {requirements.name} are installed"


# report_to names -> the packages transformers' callback imports (any one of them will do); the other names it
# knows are left to transformers (transformers.integrations.INTEGRATION_TO_CALLBACK holds them all)
UNCHECKED_TRACKERS = ("azure_ml", "dagshub", "flyte", "kubeflow", "neptune")
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",), "wandb": ("wandb",),
            "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",),
            "swanlab": ("swanlab",), "codecarbon": ("codecarbon",)}
EXTRAS = ("tensorboard", "trackio")  # trackers `make setup EXTRAS=...` installs, pinned in requirements-extras.txt


def check_trackers(recipe) -> str:
    """Every tracker named by report_to in any method section (whichever method runs) is importable: without
    it transformers would stop at the first step, after the model has loaded."""
    import importlib.util

    asked = {}
    for method, section in recipe.methods.items():
        value = section.get("report_to") or []
        for name in [value] if isinstance(value, str) else value:
            if name not in ("none", "all"):  # all: transformers takes whichever trackers are installed
                asked.setdefault(name, f"{method}.report_to")
    for name, where in asked.items():
        if name not in TRACKERS and name not in UNCHECKED_TRACKERS:
            raise AppError(f"{where}: '{name}' is not a tracker transformers knows; one of "
                           f"{', '.join([*TRACKERS, *UNCHECKED_TRACKERS])}, or none")
        if name in TRACKERS and not any(importlib.util.find_spec(m) for m in TRACKERS[name]):
            fix = f"make setup EXTRAS={name}" if name in EXTRAS else f"pip install {name}"
            raise AppError(f"{where} asks for {name}, which is not installed; fix: {fix}, or take it out of "
                           f"{where}")
    return (f"trackers: {', '.join(f'{n} ({w})' for n, w in asked.items())}" if asked else
            "trackers: none (a method section's report_to: tensorboard, trackio or wandb turns one on)")


def check_converter(home: Path = llamacpp.HOME) -> str:
    llamacpp.check_converter(home)
    return f"converter: {_show(home / llamacpp.CONVERTER.name)} is from llama-cpp-python " \
           f"{llamacpp.runtime_version()}, the runtime's llama.cpp release"


def tokenizer_folder(recipe) -> Path | None:
    """The model's folder when its tokenizer can be read without a download or a build, else None."""
    return model_folder(recipe)


def check_model_source(recipe, folder: Path | None) -> str:
    """Where the model comes from, with app.model's own file checks (config.json, safetensors weights, a
    tokenizer with a chat template). A model that is not here (a folder that does not exist; a hub model
    that is not cached while HF_HUB_OFFLINE is set) is refused by app.model.check_model_environment itself,
    in the words training would use a moment later (with the missing GPU too, when that is also the case)."""
    from app.model import check_cached_weights, check_model_environment, check_model_folder

    name = recipe.model.name
    if name in BUILT:
        built_model(name).check_source()
        return (f"model: {name}, built in {_show(folder)}" if folder else
                f"model: {name} is not built yet: training builds it first; the tokenizer checks are skipped")
    local = local_folder(name)
    if local:
        check_model_folder(local, recipe)
        return f"model: local folder {name}"
    if folder:
        if not recipe.model.allow_pickle:
            check_cached_weights(name)
        return f"model: {name} is in the local Hugging Face cache"
    if offline() or is_path(name):
        check_model_environment(recipe)  # raises: no hub call when offline (it only probes the network when not)
    return f"model: {name} is not cached: training downloads it first; the tokenizer checks are skipped"


def check_data(recipe) -> tuple[str, int | None]:
    """(line, training rows or None when unknown). A local file is read and every row checked exactly as
    training will (app.data); a hub dataset is only looked for in the cache (loading it takes longer than
    all of preflight; `python -m app data inspect` checks it)."""
    from app import data as appdata

    source = recipe.data.source
    path = repo_path(source)
    local = path.exists() or path.suffix in appdata.LOCAL_SUFFIXES or source.startswith((".", "/"))
    if not local:
        cached = (_hub_cache() / f"datasets--{source.replace('/', '--')}").is_dir()
        max_rows = recipe.data.max_rows
        rows = round(max_rows * (1 - (recipe.data.eval_share or 0))) if max_rows else None
        if cached:
            return f"data: hub dataset {source} is in the local cache (its rows are checked when training loads it)", rows
        if offline() or offline("HF_DATASETS_OFFLINE"):
            raise AppError(f"dataset '{source}' is not in the local Hugging Face cache and offline mode is set; "
                           f"fix: download it once with network, or point data.source at a local file")
        return f"data: hub dataset {source} is not cached: training downloads it first", rows
    if path.is_dir():
        return f"data: dataset folder {source} (its rows are checked when training loads it)", None
    read = appdata.read_recipe_rows(recipe.data)
    if not read:
        raise AppError(f"{source}: the dataset is empty")
    first = next((row for _, row in read if isinstance(row, dict)), None)
    first = appdata.map_columns(first, recipe.data.columns, "the first row") if first else {}
    if "chosen" not in first and ("messages" in first or "completion" in first):  # sft / kto data, not pairs
        return (f"data: {source}: {len(read)} rows that are not pairs (for sft or kto; checked when training loads "
                f"them)", len(read))
    rows, formats, dropped = appdata.normalize_rows(read, recipe.data.columns)
    if not rows:
        reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
        raise AppError(f"{source}: no usable rows among {len(read)} ({reasons})")
    held_out = appdata.held_out_count(len(rows), recipe.data)
    dropped_text = "".join(f", {n} dropped ({reason})" for reason, n in dropped.items())
    return (f"data: {source} ({'+'.join(sorted(formats))}): {len(rows)} usable of {len(read)} rows{dropped_text}",
            len(rows) - held_out)


def disk_needed(recipe, arch, params: float, train_rows: int | None) -> dict:
    """Bytes a run writes into exports/: kept checkpoints (adapter, TRL's reference adapter copy, optimizer
    state), the final adapter, the merged 16-bit weights and every GGUF, plus the converter's base file
    when it is not one of them (made, quantized from, then deleted), and the base model's f16 GGUF when
    export.base asks for it."""
    dpo = training_section(recipe)
    lora = arch.lora_params(recipe.lora.r, recipe.lora.target_modules) if arch else 0
    optimizer = 2 if "8bit" in str(dpo.get("optim", "")) else 8
    batch = train_setting(recipe, "per_device_train_batch_size") * train_setting(recipe, "gradient_accumulation_steps")
    steps = dpo.get("max_steps") or 0
    if steps <= 0 and train_rows:
        steps = round(dpo.get("num_train_epochs", 3) * -(-train_rows // batch))
    limit = dpo.get("save_total_limit") or 2  # app/train.py's default
    saves = steps // (dpo.get("save_steps") or 500) if steps else limit + 1
    kept = 0 if dpo.get("save_strategy") == "no" else min(saves, limit + 1)  # a new one is written before the oldest goes
    types = list(recipe.export.gguf)
    base = "f32" if "f32" in types else "f16"
    from app.gguf import GGUF_BITS
    ggufs = sum(GGUF_BITS[t] for t in types + ([base] if base not in types else [])) / 8 * params
    checkpoint, adapter = lora * (4 + 4 + optimizer), lora * 8
    if recipe.model.full_finetuning:  # a checkpoint holds every weight and its optimizer state; no adapter
        checkpoint, adapter = params * ((4 if recipe.model.dtype == "float32" else 2) + optimizer), 0
    return {"checkpoints": kept * checkpoint, "adapter": adapter, "merged": 2 * params,
            "gguf": ggufs, "base gguf": 2 * params if recipe.export.base else 0}


def check_disk(recipe, arch, train_rows: int | None) -> str:
    from app.runs import EXPORTS

    params = arch.params if arch else parse_params(recipe.model.params)
    if not params:
        return "disk: skipped, the model's size is unknown (set model.params, e.g. 7B)"
    need = disk_needed(recipe, arch, params, train_rows)
    total = sum(need.values())
    where = EXPORTS if EXPORTS.exists() else ROOT
    free = shutil.disk_usage(where).free
    parts = (f"checkpoints {need['checkpoints'] / GiB:.1f}, merged 16-bit weights {need['merged'] / GiB:.1f}, "
             f"GGUF {'/'.join(recipe.export.gguf)} {need['gguf'] / GiB:.1f} GiB")
    if free < total:
        raise AppError(f"exports/ has {free / GiB:.1f} GiB free on its disk but this run writes about "
                       f"{total / GiB:.1f} GiB ({parts}); fix: free some space (old runs in exports/) or ask for "
                       f"fewer export.gguf types")
    return f"disk: {free / GiB:.1f} GiB free in exports/, the run writes about {total / GiB:.2f} GiB ({parts})"


def evaluation_tokens(recipe, train_rows: int | None) -> dict:
    """Upper bounds of the tokens each stage processes, from max_length: training (chosen and rejected of
    every example, steps x effective batch), held-out evaluation (every pair before and after training) and
    smoke (the merged reference and each GGUF score every pair, plus the probes)."""
    section = training_section(recipe)
    length = train_setting(recipe, "max_length")
    batch = train_setting(recipe, "per_device_train_batch_size") * train_setting(recipe, "gradient_accumulation_steps")
    steps = section.get("max_steps") or 0
    if steps <= 0:
        steps = round(section.get("num_train_epochs", 3) * -(-(train_rows or 0) // batch))
    share = recipe.data.eval_share  # of all rows; train_rows is the rest
    pairs = min(recipe.data.eval_pairs, max(1, round((train_rows or 0) * share / (1 - share))))
    pair = 2 * length  # chosen and rejected, prompt included
    from app.smoke import MAX_NEW_TOKENS
    probes = len(recipe.export.probes) * 2 * MAX_NEW_TOKENS  # prompt + reply twice, replies up to smoke's cap
    return {"train": steps * batch * pair, "evaluate": 2 * pairs * pair,
            "smoke": (1 + len(recipe.export.gguf)) * (pairs * pair + probes), "pairs": pairs}


def check_evaluation_cost(recipe, train_rows: int | None) -> str:
    """Held-out evaluation and smoke next to training, in compute: a forward token costs ~2 FLOPs per
    parameter, a DPO training token ~8 (policy forward and backward, reference forward)."""
    t = evaluation_tokens(recipe, train_rows)
    share = (t["evaluate"] + t["smoke"]) * 2 / max(1, t["train"] * 8)
    return (f"evaluation and smoke: at most {t['evaluate']:,} + {t['smoke']:,} tokens of forward passes "
            f"({t['pairs']} held-out pairs; data.eval_pairs sets it) against {t['train']:,} training tokens: "
            f"about {share:.0%} of the training's compute, so expect them to take about that share of its time")


def check_gpu_memory(recipe, arch, arch_source: str, cuda: dict | str | None) -> tuple[str, dict]:
    """(line, the training fields model.auto_fit changes: {} without it). `cuda`: {free, total, name} from
    torch.cuda.mem_get_info in the child, None without CUDA, "unknown" when the child timed out."""
    if arch is None:
        return (f"GPU memory: no estimate, the architecture of {recipe.model.name} is unknown (not local, "
                f"not cached, not in app/memory.py's table)"), {}
    est = estimate_training_memory(recipe, arch=arch)
    shape = f"batch {est.batch} x max_length {est.length}"
    choices = reference_choices(recipe, arch)
    if choices:
        shape += f" ({choices})"
    if cuda == "unknown":  # the child that asks torch timed out
        return f"GPU memory: estimated peak {est.total:.1f} GiB at {shape}; the GPU's free memory is unknown", {}
    if cuda is None:
        return (f"GPU memory: estimated peak {est.total:.1f} GiB at {shape} ({est.summary()}; from {arch_source}); "
                f"no GPU is present (no CUDA device), so there is nothing to compare it with"
                + ("; this recipe sets model.requires_gpu" if recipe.model.requires_gpu else "")), {}
    free, gpu = cuda["free"] / GiB, f"{cuda['name']} ({cuda['total'] / GiB:.0f} GiB)"
    if recipe.model.auto_fit and not _is_run_recipe(recipe):
        changes, sentence = fit_to_memory(recipe, free, arch)
        if estimate_training_memory(with_training_changes(recipe, changes), arch=arch).total > free:
            raise AppError(f"{sentence} on {gpu}; fix: a shorter dpo.max_length, a smaller model or a larger GPU")
        return f"GPU memory: {sentence} on {gpu}", changes
    if est.total > free:
        raise AppError(f"recipe '{recipe.name}' needs about {est.total:.1f} GiB of GPU memory at {shape} but "
                       f"{gpu} has {free:.1f} GiB free; fix: make dpo FIT=1 (model.auto_fit: true) picks a batch "
                       f"that fits, or lower dpo.per_device_train_batch_size or dpo.max_length")
    return (f"GPU memory: estimated peak {est.total:.1f} GiB at {shape} of {free:.1f} GiB free on {gpu} "
            f"({est.summary()})"), {}


def llamacpp_gpu_offload() -> bool:
    """Whether the installed llama.cpp was built with GPU support (make setup GPU=1)."""
    import llama_cpp
    return bool(llama_cpp.llama_supports_gpu_offload())


def check_after_training(recipe, arch, cuda: dict | str | None, offload: bool) -> str:
    """Where smoke runs once training is over, from the same placement rules it will use (app/smoke.py
    reference_placement, app/gguf.py gpu_layers_for), with the memory free now less the training
    process's CUDA context: the post-training peak is the reference or one GGUF in llama.cpp, never both.
    Said with a warning when a GPU is present and llama.cpp cannot use it."""
    import psutil

    from app.gguf import GGUF_BITS, gpu_layers_for
    from app.smoke import reference_placement

    if arch is None or not METHODS[recipe.stages[-1]].chat_model:
        return "after training: no smoke estimate (" + ("a reward model has no GGUF)" if arch else "the architecture is unknown)")
    free_gpu = max(0, cuda["free"] - CUDA_CONTEXT_GIB * GiB) if isinstance(cuda, dict) else None
    place = reference_placement(arch.params, 2, free_gpu, psutil.virtual_memory().available)
    files = []
    for kind in recipe.export.gguf:
        size = GGUF_BITS[kind] / 8 * arch.params
        n = gpu_layers_for(int(size), arch.layers, free_gpu, offload)
        files.append(f"{kind} {size / GiB:.1f} GiB " + ("on the GPU" if n == -1 else f"{n} of {arch.layers} layers on the GPU"
                                                        if n else "on the CPU"))
    where = {"cuda": "on the GPU", "cuda+cpu": "split between the GPU and host memory", "cpu": "on the CPU",
             "none": "NOWHERE: it does not fit"}[place["device"]]
    line = (f"after training: smoke's reference, the merged model in {place['dtype'] or '-'}, runs {where} "
            f"({place['why']}); llama.cpp: {', '.join(files)}")
    if isinstance(cuda, dict) and not offload:
        logger.warning(f"a GPU is present ({cuda['name']}) but llama.cpp was built without GPU support, so smoke, chat "
                       f"and serve run every GGUF on the CPU (slowly at this size); fix: `make setup GPU=1` rebuilds it "
                       f"with CUDA")
    return line


def _is_run_recipe(recipe) -> bool:
    from app.runs import EXPORTS
    return EXPORTS.resolve() in Path(recipe.path).resolve().parents


def _hub_cache() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE).resolve()


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def tokenizer_key(recipe, folder: Path, home: Path) -> str:
    """A hash of everything the tokenizer and template checks read: the model folder's files other than
    weights, the recipe's chat template settings, the converter's release, the libraries that tokenize and
    the app code that saves the tokenizer for the converter."""
    import importlib.metadata

    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
                       and not p.name.endswith(".index.json")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    settings = [recipe.model.name, recipe.model.chat_template, recipe.model.trust_remote_code]
    versions = [importlib.metadata.version(p) for p in ("transformers", "tokenizers", "llama_cpp_python")]
    stamp = home / "VERSION"
    h.update(json.dumps([settings, versions, stamp.read_text() if stamp.is_file() else None]).encode())
    for module in ("preflight.py", "preflight_child.py", "llamacpp.py", "model.py"):
        h.update((ROOT / "app" / module).read_bytes())
    return h.hexdigest()[:24]


def read_cached(cache: Path | None, key: str | None) -> dict | None:
    path = cache / f"{key}.json" if cache and key else None
    if not path or not path.is_file():
        return None
    answers = json.loads(path.read_text())
    logger.info(f"tokenizer and template checks: cached in {path}")
    return {k: {**v, "text": f"{v['text']} (cached: these files passed before)"} for k, v in answers.items()}


def write_cached(cache: Path, key: str, answers: dict):
    """Only checks that ran and passed are kept, never a skip."""
    if not all(a["status"] == "passed" for a in answers.values()):
        return
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(answers))
    tmp.rename(cache / f"{key}.json")
