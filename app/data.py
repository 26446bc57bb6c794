"""Preference data: load a local file or a hub dataset, detect its format, check every row, split.

Rows leave this stage in TRL's conversational preference format:
    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
so that DPOTrainer renders every pair through the model's own chat template (plain strings would be
trained without it, and the model would then see a different layout at chat time).

Formats, detected per row:
    standard         prompt, chosen, rejected as strings
    conversational   message lists, with a prompt list or without (then the shared leading messages are it)
    hh               Anthropic HH raw: only chosen and rejected, each a whole "\n\nHuman: ... \n\nAssistant: ..."
                     dialogue, split at the LAST "\n\nAssistant:" of each side
Other column names are mapped by the recipe: data.columns: {prompt: question, chosen: good, rejected: bad}.
A row that is malformed (missing column, not an object) stops the run naming its line; a row that is
merely unusable (empty, chosen == rejected, duplicate, ...) is dropped and counted by reason.
"""
import collections
import csv
import dataclasses
import io
import json
from pathlib import Path

from app import ROOT, AppError, repo_path
from app.methods import METHODS
from app.recipe import DataSection

FIELDS = ("prompt", "chosen", "rejected")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
MAX_ROW_CHARS = 1_000_000  # a pair longer than this (prompt and both replies) is dropped: no model reads it whole


@dataclasses.dataclass
class PreferenceData:
    train: object        # datasets.Dataset
    eval: object         # datasets.Dataset or None
    source: str
    format: str          # the formats seen, e.g. "hh" or "standard"
    rows: int            # rows read
    dropped: dict        # reason -> count
    pairs: object = None  # the held-out preference pairs scored before and after training (None: not pairs)


def load_training_data(data: DataSection, method: str) -> PreferenceData:
    """The recipe's data shaped for a training method: preference pairs for dpo, orpo and reward; prompts
    for grpo and rloo (data.prompts, or the training pairs' prompts);
    prompt/completion for sft (the chosen side of pairs, or chat data: a `messages` list or prompt and
    completion); prompt/completion/label for kto (unpaired rows, or pairs split into a true and a false
    example when data.unpair is true). Held-out pairs stay pairs, for the preference evaluation."""
    read, shape = read_recipe_rows(data), METHODS[method].data
    if shape in ("chat", "unpaired"):  # sft and kto also take rows that are not pairs
        first = next((row for _, row in read if isinstance(row, dict)), None)
        if first and "chosen" not in map_columns(first, data.columns, "the first row"):
            return load_completion_data(data, read, method)
    prefs = load_preference_data(data, read)
    prefs.pairs = prefs.eval
    if shape == "prompts":  # grpo, rloo: prompts to sample replies to; the held-out pairs still score before and after
        import datasets
        if data.prompts:
            prompts = read_prompt_list(data.prompts)
        else:
            prompts = list({prompt_key(p): p for p in prefs.train["prompt"]}.values())
        prefs.train, prefs.eval = datasets.Dataset.from_list([{"prompt": p} for p in prompts]), None
    elif shape == "chat":  # sft: the chosen side
        prefs.train, prefs.eval = (None if d is None else d.remove_columns("rejected").rename_column("chosen", "completion")
                                   for d in (prefs.train, prefs.eval))
    elif shape == "unpaired":  # kto
        if not data.unpair:
            raise AppError(f"{data.source}: KTO trains on unpaired rows (prompt, completion, label); these are "
                           f"pairs: set data.unpair: true to make each pair a true and a false example")
        from trl.data_utils import unpair_preference_dataset
        prefs.train, prefs.eval = (None if d is None else unpair_preference_dataset(d) for d in (prefs.train, prefs.eval))
    return prefs


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    if not path.is_file():
        raise AppError(f"prompts file {path} does not exist (one prompt per line)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise AppError(f"prompts file {path} has no prompts (one prompt per line)")
    return prompts


def read_prompt_list(source: str, split: str = "train") -> list[list[dict]]:
    """The distinct prompts, in order, each as messages ending with the user's turn: from a text file (one a
    line) or from the `prompt` column of anything app/data.py reads (rows without one, HH dialogues or whole
    conversations, give the messages before the last reply)."""
    path = Path(source) if Path(source).is_absolute() or Path(source).exists() else ROOT / source
    if path.suffix == ".txt" or (path.is_file() and path.suffix not in LOCAL_SUFFIXES):
        return [[{"role": "user", "content": p}] for p in dict.fromkeys(read_prompts(path))]
    prompts = {}
    for where, row in read_rows(source, split):
        if not isinstance(row, dict):
            raise AppError(f"{where}: expected an object with a 'prompt'")
        prompt = row.get("prompt")
        if prompt in (None, "", []) and "chosen" in row and "rejected" in row:
            try:
                prompt = to_conversational(row, where)["prompt"]
            except DroppedRow:
                continue
        if isinstance(prompt, str) and prompt.strip():
            prompt = [{"role": "user", "content": prompt}]
        if _is_messages(prompt) and prompt[-1]["role"] == "user":
            prompts.setdefault(prompt_key(prompt), prompt)
        elif prompt not in (None, ""):
            raise AppError(f"{where}: the prompt must be text or messages ending with the user's turn")
    if not prompts:
        raise AppError(f"{source} has no prompts (a text file with one prompt a line, or rows with a 'prompt')")
    return list(prompts.values())


def prompt_key(messages: list[dict]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def load_completion_data(data: DataSection, read, method: str) -> PreferenceData:
    """Rows with a `messages` list (the last message is the reply) or prompt + completion (+ label for
    kto), in TRL's conversational prompt/completion format; there are no pairs to score."""
    rows, formats = completion_rows(read, data.columns, method)
    if not rows:
        raise AppError(f"{data.source}: the dataset is empty")
    train, evalset = split_held_out(rows, data, lambda split: completion_rows(split, data.columns, method)[0])
    return PreferenceData(train=train, eval=evalset, source=data.source, format="+".join(sorted(formats)),
                          rows=len(read), dropped={"duplicate": len(read) - len(rows)} if len(read) > len(rows) else {})


def completion_rows(read, columns, method: str) -> tuple[list[dict], set]:
    """(distinct rows in TRL's conversational prompt/completion(/label) format, formats seen)."""
    rows, formats, seen = [], set(), set()
    for where, row in read:
        row = map_columns(row, columns, where)
        if not isinstance(row, dict):
            raise AppError(f"{where}: expected an object")
        if _is_messages(row.get("messages")):
            if row["messages"][-1]["role"] != "assistant":
                raise AppError(f"{where}: the last message is the reply to learn, so it must be the assistant's")
            out, fmt = {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}, "messages"
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            out = {"prompt": [{"role": "user", "content": row["prompt"]}],
                   "completion": [{"role": "assistant", "content": row["completion"]}]}
            fmt = "completion"
        else:
            raise AppError(f"{where}: expected 'messages' (a list of role/content messages), prompt + completion, "
                           f"or prompt + chosen + rejected; it has {', '.join(map(str, row)) or 'nothing'}")
        if METHODS[method].data == "unpaired":
            if not isinstance(row.get("label"), bool):
                raise AppError(f"{where}: KTO rows need 'label': true (a good reply) or false (a bad one)")
            out["label"] = row["label"]
        key = json.dumps(out, sort_keys=True)
        if key not in seen:
            seen.add(key)
            formats.add(fmt)
            rows.append(out)
    return rows, formats


def load_preference_data(data: DataSection, read=None) -> PreferenceData:
    """`data` is the recipe's data section: source, split, config, columns, eval_share or eval_split,
    max_rows, seed. `read`: its rows when the caller has read them already."""
    source = data.source
    read, rows, formats, dropped = read_preference_rows(data, read)
    if not read:
        raise AppError(f"{source}: the dataset is empty")
    if not rows:
        reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
        raise AppError(f"{source}: no usable rows among {len(read)} ({reasons})")
    train, evalset = split_held_out(rows, data, lambda split: normalize_rows(split, data.columns)[0])
    return PreferenceData(train=train, eval=evalset, source=source, format="+".join(sorted(formats)),
                          rows=len(read), dropped=dict(dropped))


def split_held_out(rows: list[dict], data: DataSection, normalize):
    """(train, eval or None) as datasets: the rows shuffled by data.seed, and held out either the named
    data.eval_split (read and passed through `normalize`, as the train rows were) or data.eval_share of them."""
    import datasets
    source, share = data.source, data.eval_share
    dataset = datasets.Dataset.from_list(rows).shuffle(seed=data.seed)
    if data.eval_split:  # a named held-out split (e.g. test_prefs) instead of a share
        eval_rows = normalize(read_rows(source, data.eval_split, data.config))
        if not eval_rows:
            raise AppError(f"{source}: split '{data.eval_split}' has no usable rows")
        return dataset, datasets.Dataset.from_list(eval_rows)
    if not share:
        return dataset, None
    n_eval = held_out_count(len(dataset), data)
    return dataset.select(range(n_eval, len(dataset))), dataset.select(range(n_eval))


def held_out_count(rows: int, data: DataSection) -> int:
    """How many of `rows` the data section holds out: none with a named eval_split (its own rows are) or
    no eval_share, else eval_share of them and at least one; AppError when none would be left to train on."""
    share = data.eval_share
    if data.eval_split or not share:
        return 0
    n_eval = max(1, round(rows * share))
    if rows - n_eval < 1:
        raise AppError(f"{data.source}: {rows} rows are too few to hold out {share:.0%} for evaluation")
    return n_eval


def inspect_data(data: DataSection, tokenizer=None, max_length: int | None = None) -> tuple[dict, list[dict]]:
    """(report, normalized rows) for `data inspect`: format, counts by reason and, given the recipe's
    tokenizer, how many pairs exceed max_length tokens once rendered through the chat template."""
    read, rows, formats, dropped = read_preference_rows(data)
    report = {"source": data.source, "format": "+".join(sorted(formats)) or "none",
              "rows_read": len(read), "rows_kept": len(rows), "dropped": dict(dropped)}
    if tokenizer is not None and max_length:
        report["longer_than_max_length"] = sum(
            max(len(tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=True, return_dict=True)["input_ids"])
                for side in ("chosen", "rejected")) > max_length for r in rows)
        report["max_length"] = max_length
    return report, rows


def read_recipe_rows(data: DataSection) -> list[tuple[str, dict]]:
    """The rows of the recipe's data section as read, (where, row), the first data.max_rows of them."""
    read = read_rows(data.source, data.split, data.config)
    return read[: data.max_rows] if data.max_rows else read


def read_preference_rows(data: DataSection, read=None):
    """(rows read, normalized rows, formats seen, dropped counts) for the recipe's data section."""
    read = read_recipe_rows(data) if read is None else read
    return (read, *normalize_rows(read, data.columns))


def normalize_rows(read, columns=None) -> tuple[list[dict], set, collections.Counter]:
    """(rows in TRL's conversational format, formats seen, Counter of dropped rows by reason)."""
    rows, formats, dropped, seen = [], set(), collections.Counter(), set()
    for where, row in read:
        row = map_columns(row, columns, where)
        fmt = detect_format(row)
        try:
            row = to_conversational(row, where)
        except DroppedRow as e:
            dropped[e.reason] += 1
            continue
        key = json.dumps(row, sort_keys=True)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        formats.add(fmt)
        rows.append(row)
    return rows, formats, dropped


class DroppedRow(Exception):
    """A row that is well-formed but unusable; counted by reason, not fatal."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def map_columns(row, columns, where):
    if not columns or not isinstance(row, dict):
        return row
    missing = [name for name in columns.values() if name not in row]
    if missing:
        raise AppError(f"{where}: no column '{missing[0]}' (mapped in data.columns); it has {', '.join(row)}")
    return {**{k: v for k, v in row.items() if k not in FIELDS}, **{ours: row[theirs] for ours, theirs in columns.items()}}


def detect_format(row) -> str:
    if not isinstance(row, dict):
        return "invalid"
    chosen = row.get("chosen")
    if row.get("prompt") in (None, "") and isinstance(chosen, str) and HUMAN in chosen and ASSISTANT in chosen:
        return "hh"
    return "conversational" if isinstance(chosen, list) else "standard"


def read_rows(source: str, split: str = "train", config: str | None = None) -> list[tuple[str, dict]]:
    """[(where, row)] with `where` naming the line or row for error messages. A folder is loaded by
    `datasets` exactly like a hub id (a saved or downloaded dataset)."""
    path = repo_path(source)
    if path.is_dir():
        return read_hub_rows(str(path), split, config)
    if path.suffix in LOCAL_SUFFIXES or path.exists() or source.startswith((".", "/")):
        if not path.is_file():
            raise AppError(f"data file {source} does not exist")
        return read_local_rows(path)
    return read_hub_rows(source, split, config)


def read_local_rows(path: Path) -> list[tuple[str, dict]]:
    name = path.name
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(read_text_file(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{name} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise AppError(f"{name} line {n}: not valid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            items = json.loads(read_text_file(path))
        except json.JSONDecodeError as e:
            raise AppError(f"{name} line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise AppError(f"{name}: expected a JSON list of rows")
        return [(f"{name} row {i}", row) for i, row in enumerate(items, 1)]
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""))
        return [(f"{name} line {i}", row) for i, row in enumerate(reader, 2)]
    if path.suffix == ".parquet":
        import pyarrow.parquet  # read directly: datasets would copy the file into its cache first
        try:
            table = pyarrow.parquet.read_table(path)
        except Exception as e:  # pyarrow's ArrowInvalid and kin
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AppError(f"{name}: not a readable Parquet file ({reason})") from None
        return [(f"{name} row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]
    raise AppError(f"{name}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")


def read_text_file(path: Path) -> str:
    """The file as text: UTF-8 (a UTF-8 byte-order mark is allowed); anything else is an error naming the
    line, since every other encoding would turn the text into different tokens without a word."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise AppError(f"{path.name} line {line}: not UTF-8 text (" + ("it starts with a UTF-16 byte-order mark"
                       if utf16 else f"byte 0x{raw[e.start]:02x}, e.g. Latin-1 or Windows-1252") +
                       "); save the file as UTF-8") from None
    if "\0" in text:
        raise AppError(f"{path.name} line {text[:text.index(chr(0))].count(chr(10)) + 1}: NUL bytes in the text "
                       f"(UTF-16 without a byte-order mark?); save the file as UTF-8")
    return text


def read_hub_rows(source: str, split: str, config: str | None = None) -> list[tuple[str, dict]]:
    import datasets
    try:
        dataset = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # offline, unknown id, unknown split: datasets raises many types
        raise AppError(f"could not load dataset '{source}' split '{split}' from the hub or its cache "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return [(f"{source} row {i}", row) for i, row in enumerate(dataset, 1)]


def to_conversational(row, where: str) -> dict:
    """One row -> TRL's conversational format. AppError (naming the row) when it is malformed;
    DroppedRow when it is well-formed but unusable."""
    if not isinstance(row, dict):
        raise AppError(f"{where}: expected an object with {', '.join(FIELDS)}")
    fmt = detect_format(row)
    needed = FIELDS if fmt == "standard" else ("chosen", "rejected")  # hh and conversational may omit prompt
    missing = [k for k in needed if k not in row]
    if missing:
        raise AppError(f"{where}: missing '{missing[0]}'; its columns are {', '.join(map(repr, row)) or 'none'} "
                       f"(each row needs {', '.join(FIELDS)}, which a CSV names in its first line, the header; "
                       f"map other column names with data.columns)")
    if fmt == "hh":
        row = split_hh_dialogues(row["chosen"], row["rejected"])
    elif row.get("prompt") in (None, "", []) and all(_is_messages(row.get(k)) for k in ("chosen", "rejected")):
        row = split_shared_prompt(row)
    out = {}
    for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        value = row.get(key)
        if isinstance(value, str):
            value = [{"role": role, "content": value}]
        elif not _is_messages(value):
            raise DroppedRow(f"empty {key}" if value in (None, "", []) else f"non-string {key}")
        if any(not isinstance(m["content"], str) for m in value):
            raise DroppedRow(f"non-string {key}")
        if not value[-1]["content"].strip():
            raise DroppedRow(f"empty {key}")
        out[key] = [{"role": m["role"], "content": m["content"]} for m in value]
    if out["chosen"] == out["rejected"]:
        raise DroppedRow("chosen equals rejected")
    if sum(len(m["content"]) for side in out.values() for m in side) > MAX_ROW_CHARS:
        raise DroppedRow(f"longer than {MAX_ROW_CHARS:,} characters")
    return out


def split_hh_dialogues(chosen: str, rejected: str) -> dict:
    """Anthropic HH raw: each side is a whole dialogue. The response is what follows the LAST
    "\n\nAssistant:"; everything before it is the prompt and must be the same on both sides. (A
    character-level common prefix would cut into the replies whenever they begin with the same words.)"""
    (prompt_c, reply_c), (prompt_r, reply_r) = (_split_last_turn(t) for t in (chosen, rejected))
    if prompt_c != prompt_r:
        raise DroppedRow("hh prompts differ")
    return {"prompt": _hh_messages(prompt_c), "chosen": reply_c.strip(), "rejected": reply_r.strip()}


def _split_last_turn(text: str) -> tuple[str, str]:
    cut = text.rfind(ASSISTANT)
    return text[:cut], text[cut + len(ASSISTANT):]


def _hh_messages(prompt: str) -> list[dict]:
    """"\n\nHuman: a\n\nAssistant: b\n\nHuman: c" -> user/assistant/user messages."""
    messages, rest = [], prompt
    while rest:
        role = "user" if rest.startswith(HUMAN) else "assistant" if rest.startswith(ASSISTANT) else None
        if role is None:
            raise DroppedRow("hh turn markers malformed")
        rest = rest[len(HUMAN if role == "user" else ASSISTANT):]
        nxt = min([i for i in (rest.find(HUMAN), rest.find(ASSISTANT)) if i >= 0], default=len(rest))
        messages.append({"role": role, "content": rest[:nxt].strip()})
        rest = rest[nxt:]
    if not messages or messages[-1]["role"] != "user":
        raise DroppedRow("hh prompt does not end with a human turn")
    return messages


def split_shared_prompt(row: dict) -> dict:
    """Whole conversations on both sides: the shared leading messages are the prompt. Split by message,
    never by characters, so replies that begin with the same words stay whole."""
    chosen, rejected = row["chosen"], row["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DroppedRow("no shared prompt messages")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)
