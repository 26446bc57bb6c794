"""Preference data: load a local file or a hub dataset, check every row, convert to TRL's format, split.

Rows leave this stage in TRL's conversational preference format:
    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
so that DPOTrainer renders every pair through the model's own chat template (plain strings would be
trained without it, and the model would then see a different layout at chat time).
"""
import csv
import dataclasses
import json
from pathlib import Path

from app import ROOT, AppError

FIELDS = ("prompt", "chosen", "rejected")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclasses.dataclass
class PreferenceData:
    train: object        # datasets.Dataset
    eval: object         # datasets.Dataset or None
    source: str
    rows: int            # rows read, before the split


def load_preference_data(data: dict) -> PreferenceData:
    """`data` is the recipe's data section: source, split, eval_share, max_rows, seed."""
    source = str(data["source"])
    rows = read_rows(source, data.get("split", "train"))
    if data.get("max_rows"):
        rows = rows[: int(data["max_rows"])]
    if not rows:
        raise AppError(f"{source}: the dataset is empty")
    rows = [to_conversational(row, where) for where, row in rows]

    import datasets
    dataset = datasets.Dataset.from_list(rows).shuffle(seed=data.get("seed", 0))
    share, evalset = data.get("eval_share") or 0, None
    if share:
        n_eval = max(1, round(len(dataset) * share))
        if len(dataset) - n_eval < 1:
            raise AppError(f"{source}: {len(dataset)} rows are too few to hold out {share:.0%} for evaluation")
        dataset, evalset = dataset.select(range(n_eval, len(dataset))), dataset.select(range(n_eval))
    return PreferenceData(train=dataset, eval=evalset, source=source, rows=len(rows))


def read_rows(source: str, split: str) -> list[tuple[str, dict]]:
    """[(where, row)] with `where` naming the line or row for error messages."""
    path = Path(source) if Path(source).is_absolute() else ROOT / source
    if path.suffix in LOCAL_SUFFIXES or path.exists() or source.startswith((".", "/")):
        if not path.is_file():
            raise AppError(f"data file {source} does not exist")
        return read_local_rows(path)
    return read_hub_rows(source, split)


def read_local_rows(path: Path) -> list[tuple[str, dict]]:
    name = path.name
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{name} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise AppError(f"{name} line {n}: not valid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise AppError(f"{name} line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise AppError(f"{name}: expected a JSON list of rows")
        return [(f"{name} row {i}", row) for i, row in enumerate(items, 1)]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [(f"{name} line {i}", row) for i, row in enumerate(csv.DictReader(f), 2)]
    if path.suffix == ".parquet":
        import datasets
        return [(f"{name} row {i}", row) for i, row in enumerate(datasets.Dataset.from_parquet(str(path)), 1)]
    raise AppError(f"{name}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")


def read_hub_rows(source: str, split: str) -> list[tuple[str, dict]]:
    import datasets
    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown id, unknown split: datasets raises many types
        raise AppError(f"could not load dataset '{source}' split '{split}' from the hub or its cache "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return [(f"{source} row {i}", row) for i, row in enumerate(dataset, 1)]


def to_conversational(row, where: str) -> dict:
    """A row -> TRL's conversational preference format, or AppError naming the row. Accepted:
    strings (prompt/chosen/rejected), message lists, and message lists without `prompt` (as in
    trl-lib/ultrafeedback_binarized), where the prompt is the messages both sides share."""
    if not isinstance(row, dict):
        raise AppError(f"{where}: expected an object with {', '.join(FIELDS)}")
    if row.get("prompt") in (None, "", []) and all(_is_messages(row.get(k)) for k in ("chosen", "rejected")):
        row = split_shared_prompt(row, where)
    missing = [k for k in FIELDS if row.get(k) in (None, "", [])]
    if missing:
        raise AppError(f"{where}: missing or empty '{missing[0]}' (each row needs {', '.join(FIELDS)})")
    out = {}
    for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        value = row[key]
        if isinstance(value, str):
            value = [{"role": role, "content": value}]
        elif not _is_messages(value):
            raise AppError(f"{where}: '{key}' must be a string or a list of {{role, content}} messages")
        out[key] = [{"role": m["role"], "content": m["content"]} for m in value]
    return out


def split_shared_prompt(row: dict, where: str) -> dict:
    """Whole conversations on both sides: the shared leading messages are the prompt. Split by message,
    never by characters, so replies that begin with the same words stay whole."""
    chosen, rejected = row["chosen"], row["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or chosen[n:] == [] or rejected[n:] == []:
        raise AppError(f"{where}: 'chosen' and 'rejected' share no prompt messages and there is no 'prompt'")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)
