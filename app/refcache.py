"""DPO's reference log-probs, scored once and kept on disk (.cache/ref-logps/), for every run that needs them.

DPO compares the policy with a frozen reference on every chosen and rejected reply. TRL scores the
reference inside every step, or once before training with `precompute_ref_log_probs`, and then for that
run only (its own cache misses across runs: its key hashes a closure holding the whole DPOConfig,
output_dir and beta included). Beta sweeps, loss-type comparisons, resumes and reruns score the same
frozen model on the same token ids every time. Here they are scored once, by TRL's own
`compute_ref_log_probs`, kept under a key of everything they depend on, and handed to TRL as the
`ref_chosen_logps` / `ref_rejected_logps` columns that its loss reads when `precompute_ref_logps` is set.

The key: sha256 of the reference's weight files (and config.json), every token id of the tokenized
pairs in order, the chat template and special token ids, the DPOConfig fields the reference pass reads,
the model's dtype, 4-bit quantization and device, and the versions of the libraries that compute it. The
LoRA settings are not in it: the reference runs with the adapter off, or on TRL's "ref" copy of its
initial weights, whose B is zero, so it adds exactly nothing.

`dpo.precompute_ref_log_probs`: true (always), false (TRL's reference pass in every step) or auto (the
default): a cached result is always used; otherwise the reference is scored up front when that scores
fewer sequences than the run's own reference passes would (`should_precompute`), and model.auto_fit sets
true when memory is tight (app/memory.py).
"""
import hashlib
import json
import logging
import time
from pathlib import Path

from app import ROOT
from app.runs import sha256, write_bytes

logger = logging.getLogger(__name__)

CACHE = ROOT / ".cache" / "ref-logps"
# DPOConfig fields that change what the reference pass computes (loss settings such as beta do not)
REFERENCE_FIELDS = ("max_length", "truncation_mode", "ld_alpha", "padding_free", "pad_to_multiple_of")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo")
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def should_precompute(setting, cached: bool, train_rows: int, eval_rows: int, train_pairs_seen: int,
                      eval_passes: int) -> tuple[bool, str]:
    """(score the reference up front?, why), for precompute_ref_log_probs = true, false or "auto".
    Auto: always when cached; else when one pass over the data scores fewer pairs than the run's own
    reference passes would (each training pair seen, each evaluation's held-out pairs)."""
    if setting is False:
        return False, "precompute_ref_log_probs is false: the reference is scored in every step"
    if cached:
        return True, "cached"
    if setting is True:
        return True, "precompute_ref_log_probs is true"
    upfront, inline = train_rows + eval_rows, train_pairs_seen + eval_passes * eval_rows
    if upfront <= inline:
        return True, f"one pass scores {upfront} pairs, the run's own reference passes {inline}"
    return False, (f"the run sees too few pairs for a pass over the data to pay ({upfront} pairs up front "
                   f"against {inline} in its steps)")


def reference_passes(args, train_rows: int) -> tuple[int, int]:
    """(training pairs the run sees, evaluations it runs) from its DPOConfig: each is a reference pass
    when the reference is scored in every step. Evaluations: app/train.py's at step 0 and at the end (the
    end reuses TRL's last one when that fell on the last step), and TRL's every eval_steps or each epoch."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    steps = args.max_steps if args.max_steps > 0 else -(-int(args.num_train_epochs * train_rows) // per_step)
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if strategy == "steps":
        every = args.eval_steps or args.logging_steps or 1
        every = max(int(every if every >= 1 else every * steps), 1)  # a float below 1 is a share of the steps
        return steps * per_step, 1 + steps // every + (steps % every != 0)
    if strategy == "epoch":
        return steps * per_step, 1 + max(int(args.num_train_epochs), 1)
    return steps * per_step, 2


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def key_parts(trainer, model_folder: Path | None, recipe) -> dict | None:
    """Everything the reference log-probs depend on besides the token ids (the same for the train and the
    eval data); None when the weights have no files on this machine to hash (then nothing is cached)."""
    import importlib.metadata

    import torch

    weights = weight_file_hashes(model_folder) if model_folder else None
    if not weights:
        return None
    tok, args, model = trainer.processing_class, trainer.args, trainer.model
    tok = getattr(tok, "tokenizer", tok)  # a processor's tokenizer
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "weights": weights,
        "chat_template": hashlib.sha256(str(getattr(tok, "chat_template", "")).encode()).hexdigest(),
        "special_ids": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
        "dpo": {f: getattr(args, f, None) for f in REFERENCE_FIELDS},
        "load_in_4bit": recipe.model.load_in_4bit, "dtype": str(model.dtype),
        "autocast": [bool(args.bf16), bool(args.fp16)], "device": torch.device(trainer.accelerator.device).type,
        "versions": versions,
    }


def token_ids_digest(dataset) -> str:
    """sha256 of every token id of the tokenized pairs, in the dataset's order (the order the cached rows
    are in), read from the Arrow buffers without a Python loop over rows."""
    import numpy as np

    if dataset._indices is not None:  # a select/shuffle view: its logical order, materialised
        dataset = dataset.flatten_indices()
    h = hashlib.sha256()
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        values = dataset.data.column(column).combine_chunks()
        offsets = np.asarray(values.offsets) - values.offsets[0].as_py()
        h.update(column.encode() + offsets.astype(np.int64).tobytes())
        h.update(np.asarray(values.flatten()).astype(np.int64).tobytes())
    return h.hexdigest()


def weight_file_hashes(folder: Path, memo: Path | None = None) -> dict:
    """{file name: sha256} of a model folder's weights and config.json (an adapter folder's base too).
    Hashing 16 GB takes about a minute, so each file's digest is remembered by path, size and mtime."""
    memo = memo or CACHE / "file-hashes.json"
    known = json.loads(memo.read_text()) if memo.is_file() else {}
    out, changed = {}, False
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not (path.suffix in WEIGHT_SUFFIXES or path.name in ("config.json", "adapter_config.json")):
            continue
        stat = path.stat()
        stamp = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
        entry = known.get(stamp[0])
        if not entry or entry[:2] != stamp[1:]:
            entry = [*stamp[1:], sha256(path)]
            known[stamp[0]], changed = entry, True
        out[path.name] = entry[2]
    adapter = folder / "adapter_config.json"
    if adapter.is_file():  # the reference is the adapter's base with the adapter: hash the base as well
        from app.model import local_model_folder
        base = local_model_folder(str(json.loads(adapter.read_text()).get("base_model_name_or_path")))
        out["base"] = weight_file_hashes(base, memo) if base else None
    if changed:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(memo, json.dumps(known).encode())
    return out


def save_log_probs(path: Path, key: str, chosen, rejected):
    """The two columns in a safetensors file whose metadata holds the key, the row count and a sha256 of
    the values, written to a temporary name and renamed."""
    from safetensors.torch import save

    tensors = {"ref_chosen_logps": chosen.float().contiguous(), "ref_rejected_logps": rejected.float().contiguous()}
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors.values())).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, save(tensors, metadata={"key": key, "rows": str(len(chosen)), "sha256": digest}))


def load_log_probs(path: Path, key: str, rows: int):
    """(chosen, rejected) from a cache file, or None when it is missing or cannot be trusted: unreadable,
    another key or row count, values whose sha256 differs from the one recorded, or values no sum of
    log-probabilities can take (positive, NaN)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = [f.get_tensor(c) for c in COLUMNS]
    except Exception as e:  # a truncated or overwritten file: safetensors' own error, whatever its type
        return _refuse(path, f"unreadable ({e})")
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()
    if meta.get("key") != key or meta.get("rows") != str(rows) or any(len(t) != rows for t in tensors):
        return _refuse(path, "another key or row count")
    if meta.get("sha256") != digest:
        return _refuse(path, "its values differ from the digest it was written with")
    if not all(bool(((t <= 0) & t.isfinite()).all()) for t in tensors):
        return _refuse(path, "values that are not sums of log-probabilities")
    return tuple(tensors)


def _refuse(path: Path, why: str):
    logger.warning(f"reference log-prob cache {path.name}: {why}; scoring the reference again")
    return None


def score_reference(trainer, dataset, batch_size: int, name: str = "train", log=print):
    """(chosen, rejected) log-probs of the reference for every row of a tokenized dataset, in order, by
    TRL's own compute_ref_log_probs (adapter off, or TRL's "ref" adapter) over TRL's collator. Tens of minutes
    at 8B and 20,000 pairs: a progress bar in a terminal (tqdm, with tokens/s and the time left), and a line
    a minute in a log."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    device = trainer.accelerator.device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False)
    chosen, rejected = [], []
    t0 = last = time.monotonic()
    tokens = done = 0
    log(f"reference log-probs: scoring {len(dataset)} {name} pairs once, {batch_size} at a time")
    with tqdm(total=len(dataset), desc=f"reference ({name})", unit="pair", leave=False) as bar:
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            c, r = trainer.compute_ref_log_probs(trainer.model, batch)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
            tokens += sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor))
            done, now = done + len(c), time.monotonic()
            bar.update(len(c))
            bar.set_postfix_str(f"{tokens / (now - t0):,.0f} tok/s")
            if bar.disable and now - last > 60 and done < len(dataset):
                last = now
                log(f"  reference ({name}): {done}/{len(dataset)} pairs, {tokens / (now - t0):,.0f} tok/s, about "
                    f"{(now - t0) / done * (len(dataset) - done) / 60:.0f} min left")
    return torch.cat(chosen), torch.cat(rejected)


def reference_batch_size(trainer, recipe, name: str) -> int:
    """The batch of the up-front reference pass: on a GPU the largest the planner fits into the memory free
    now (app/memory.py reference_pass_batch; no gradients, so far more than the training batch); on a CPU
    the run's own batch."""
    import torch

    args = trainer.args
    own = args.per_device_train_batch_size if name == "train" else args.per_device_eval_batch_size
    if not torch.cuda.is_available():
        return own
    from app.memory import reference_pass_batch
    return reference_pass_batch(recipe, torch.cuda.mem_get_info()[0] / 2**30, floor=own)


def attach_reference_log_probs(trainer, recipe, model_folder: Path | None, cache: Path = CACHE, log=print) -> dict:
    """Decide, then load or score the reference log-probs of the trainer's train and eval datasets, add them
    as TRL's columns and switch the trainer to them. Returns what happened, for train.json and the console."""
    args = trainer.args
    setting = recipe.methods["dpo"].get("precompute_ref_log_probs", "auto")
    datasets = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    datasets = {name: d for name, d in datasets.items() if d is not None and len(d)}
    shared = key_parts(trainer, model_folder, recipe) if setting is not False else None
    keys = {name: cache_key({**shared, "token_ids": token_ids_digest(d), "rows": len(d)}) if shared else None
            for name, d in datasets.items()}
    found = {name: load_log_probs(cache / f"{k}.safetensors", k, len(datasets[name]))
             for name, k in keys.items() if k}
    cached = bool(datasets) and all(found.get(name) is not None for name in datasets)
    seen, evals = reference_passes(args, len(datasets.get("train", [])))
    use, why = should_precompute(setting, cached, len(datasets.get("train", [])), len(datasets.get("eval", [])),
                                 seen, evals if "eval" in datasets else 0)
    info = {"setting": setting, "precomputed": use, "why": why, "cached": [], "scored": [], "seconds": 0.0}
    if not use:
        return info
    t0 = time.time()
    for name, dataset in datasets.items():
        values = found.get(name)
        if values is None:
            size = args.precompute_ref_batch_size or reference_batch_size(trainer, recipe, name)
            values = score_reference(trainer, dataset, size, name, log)
            info["scored"].append(name)
            if keys.get(name):
                save_log_probs(cache / f"{keys[name]}.safetensors", keys[name], *values)
        else:
            info["cached"].append(name)
        for column, tensor in zip(COLUMNS, values):
            dataset = dataset.add_column(column, tensor.tolist())
        setattr(trainer, f"{name}_dataset", dataset)
    trainer.precompute_ref_logps = True  # TRL's loss now reads the columns instead of running the reference
    info["seconds"] = round(time.time() - t0, 2)
    info["keys"] = keys
    return info


def reference_line(info: dict) -> str:
    """One console line saying where this run's reference log-probs came from."""
    if not info["precomputed"]:
        return f"reference log-probs: scored in every step ({info['why']})"
    parts = ([f"{', '.join(info['cached'])} from the cache"] if info["cached"] else []) + (
        [f"{', '.join(info['scored'])} scored once in {info['seconds']:.1f}s"] if info["scored"] else [])
    if not parts:  # full fine-tuning: TRL's own pass (app/train.py)
        return f"reference log-probs: {info['why']}"
    stored = "" if not info["scored"] or all(info.get("keys", {}).values()) else " (not cached: no weight files to key them by)"
    return f"reference log-probs: {'; '.join(parts)}{stored} ({info['why']})"
