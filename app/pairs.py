"""Preference pairs from AI feedback: `python -m app pairs` turns prompts into prompt/chosen/rejected rows.

Two ways to judge, both offline:
    reward         sample --samples replies per prompt and score each with a reward run (`python -m app reward`);
                   the best is chosen, the worst rejected; a pair whose score gap is below --min-gap is dropped
    constitution   Constitutional AI's critique and revision: the model answers, critiques its answer against a
                   principle drawn from a constitution (recipes/data/constitution.yaml), then rewrites it; the
                   rewrite is chosen, the first answer rejected
The model that writes is a run's GGUF (or a .gguf file) through llama.cpp with the file's chat template, or a
recipe's model through transformers. Sampling is seeded per prompt (from --seed and the prompt's text), so a
rerun, a resumed run and a run with another --limit give every prompt the same replies.

Output: JSONL rows that `data inspect` and `dpo` read (app/data.py ignores the extra column), each with a
`provenance` object: mode, model, the reward run and scores, or the principle and the critique.
Resumable: every prompt done appends one flushed line to OUT.partial (a pair, or the reason it was dropped);
a rerun with the same settings skips the prompts found there (a torn last line, from a kill mid-write, is cut
off) and at the end the pairs are written to OUT and OUT.partial is removed, so an OUT that exists is complete.
"""
import collections
import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import yaml

from app import AppError, repo_path
from app.data import prompt_key, read_prompt_list
from app.generate import Sampling

MODES = ("reward", "constitution")
DEFAULT_CONSTITUTION = "recipes/data/constitution.yaml"
# the settings that change what a prompt's line says, by mode: a journal begun with others is not continued
RESULT_SETTINGS = {"reward": ("reward_run", "samples", "min_gap"), "constitution": ("constitution",)}
COMMON_SETTINGS = ("prompts", "split", "mode", "model", "max_new_tokens", "temperature", "top_p", "seed")


def option(default=dataclasses.MISSING, help: str = "", **argparse):
    """A setting: its default (none: the flag is required), its help, and argparse's extras (metavar, choices)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse})


@dataclasses.dataclass
class PairsSettings:
    """What `pairs` is told: each field is a flag (--min-gap for min_gap), with its default and help, which
    app/cli.py reads from here."""
    prompts: str = option(help="a text file (one prompt a line), or a dataset app/data.py reads (.jsonl, .json, .csv, "
                          ".parquet, a folder, a hub id) whose prompts are used", metavar="FILE_OR_DATASET")
    mode: str = option(help="reward: the best and worst of --samples replies by a reward run's scores; "
                       "constitution: the answer's revision after a critique against a principle", choices=MODES)
    out: str = option(help="the JSONL to write (FILE.partial until it is complete; a rerun continues it)",
                      metavar="FILE")
    model: str = option("latest", "who writes the replies: a run (its GGUF, through llama.cpp), a .gguf file, or a "
                        "recipe (its model, through transformers)", metavar="RUN_OR_GGUF_OR_RECIPE")
    quant: str | None = option(None, "which GGUF of the run (default: the one chat uses)")
    reward_run: str | None = option(None, "reward mode: the run of `python -m app reward` that scores the replies",
                                    metavar="RUN")
    samples: int = option(4, "reward mode: replies sampled per prompt")
    min_gap: float = option(0.5, "reward mode: a pair whose best and worst scores differ by less is dropped")
    constitution: str = option(DEFAULT_CONSTITUTION, "constitution mode: the principles (YAML)", metavar="FILE")
    max_new_tokens: int = option(48, "the longest reply, in tokens")
    temperature: float = option(0.8, "sampling temperature (0: greedy, constitution mode only)")
    top_p: float = option(0.95, "nucleus sampling's share of the probability mass")
    seed: int = option(0, "sampling seed: the same seed gives the same pairs")
    limit: int | None = option(None, "only the first N prompts", metavar="N")
    split: str = option("train", "a hub dataset's split")


def make_pairs(s: PairsSettings, log=print) -> dict:
    """Write s.out from s.prompts (continuing s.out + '.partial' if a stopped run left one); the counts."""
    started = time.time()
    check_settings(s)
    out = Path(s.out)
    if out.exists():
        raise AppError(f"{out} already exists; give another --out, or delete it to make it again")
    prompts = read_prompt_list(s.prompts, s.split)[:s.limit]
    if s.mode == "reward":
        from app.rewards import reward_run
        judge = reward_run(s.reward_run)
        principles = None
    else:
        judge, principles = None, read_constitution(s.constitution)
    source = model_source(s.model, s.quant)
    settings = {**dataclasses.asdict(s), "model": source[1].as_posix() if source[0] == "gguf" else s.model,
                "reward_run": judge and judge.name, "constitution": principles and file_digest(s.constitution)}
    settings = {k: settings[k] for k in (*COMMON_SETTINGS, *RESULT_SETTINGS[s.mode])}
    journal = Path(f"{out}.partial")
    done = read_journal(journal, settings)
    todo = [p for p in prompts if prompt_key(p) not in done]
    what = (f"{s.samples} samples each, scored by {judge.name}, kept when the gap is at least {s.min_gap}"
            if judge else f"answer, critique and revision against {len(principles)} principles of {s.constitution}")
    log(f"pairs ({s.mode}): {len(prompts)} prompts from {s.prompts}; {what}; model: {model_label(source)}")
    if len(prompts) > len(todo):
        log(f"resuming {journal}: {len(prompts) - len(todo)} prompts already done")
    if todo:
        write_lines(journal, settings, todo, s, source, judge, principles)
    return finish(journal, settings, out, prompts, len(prompts) - len(todo), time.time() - started)


def check_settings(s: PairsSettings):
    if s.mode not in MODES:
        raise AppError(f"--mode must be one of {', '.join(MODES)}, got '{s.mode}'")
    if s.mode == "reward" and not s.reward_run:
        raise AppError("--mode reward needs --reward-run RUN (a run made by `python -m app reward`)")
    if s.mode == "reward" and (s.samples < 2 or s.temperature <= 0):
        raise AppError(f"--mode reward needs at least 2 different replies to compare: --samples 2 or more "
                       f"(got {s.samples}) and a --temperature above 0 (got {s.temperature})")
    for flag, value in (("--max-new-tokens", s.max_new_tokens), ("--limit", s.limit or 1)):
        if value < 1:
            raise AppError(f"{flag} must be a positive whole number, got {value}")
    if s.min_gap < 0 or s.temperature < 0 or not 0 < s.top_p <= 1:
        raise AppError(f"--min-gap and --temperature must be 0 or more and --top-p in (0, 1]; got {s.min_gap}, "
                       f"{s.temperature}, {s.top_p}")


# prompts: a text file, or the prompts of a dataset

def as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def row_prompt(messages: list[dict]):
    """A one-turn prompt as plain text (the standard format), a longer conversation as its messages."""
    return messages[0]["content"] if len(messages) == 1 else messages


# the constitution

def read_constitution(path: str) -> list[dict]:
    """[{name, critique_request, revision_request}] from a YAML file: a list of principles, or a mapping
    with `principles:` holding one. AppError naming the file and principle when one is incomplete."""
    file = repo_path(path)
    if not file.is_file():
        raise AppError(f"constitution file {path} does not exist")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise AppError(f"{file.name}{f' line {mark.line + 1}' if mark else ''}: not valid YAML "
                       f"({getattr(e, 'problem', e)})") from None
    items = raw.get("principles") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise AppError(f"{file.name} has no principles (expected `principles:`, a list of entries with a "
                       f"critique_request and a revision_request)")
    principles = []
    for n, item in enumerate(items, 1):
        name = item.get("name") if isinstance(item, dict) else None
        label = f"principle {n}" + (f" ({name})" if name else "")
        for field in ("critique_request", "revision_request"):
            if not isinstance(item, dict) or not isinstance(item.get(field), str) or not item[field].strip():
                raise AppError(f"{file.name} {label} has no {field} (each principle needs a critique_request and "
                               f"a revision_request, as text)")
        principles.append({"name": str(name or f"principle {n}"), "critique_request": item["critique_request"].strip(),
                           "revision_request": item["revision_request"].strip()})
    return principles


def file_digest(path: str) -> str:
    """`path#sha256-prefix`: a constitution edited between a stop and a rerun is another setting."""
    file = repo_path(path)
    return f"{path}#{hashlib.sha256(file.read_bytes()).hexdigest()[:12]}"


# the model that writes

def model_source(arg: str, quant: str | None) -> tuple[str, object]:
    """("gguf", path) for a .gguf file or a run (its GGUF, `quant` or the one chat uses), ("hf", recipe) for
    a recipe name or file. Nothing is loaded."""
    from app.gguf import find_gguf
    from app.runs import EXPORTS

    if arg.endswith(".gguf") or arg == "latest" or any(p.is_dir() for p in (Path(arg), EXPORTS / arg)):
        return "gguf", find_gguf(arg, quant)
    from app.recipe import find_recipe, load_recipe
    try:
        find_recipe(arg)
    except AppError:
        raise AppError(f"--model {arg} is neither a run, a .gguf file nor a recipe") from None
    return "hf", load_recipe(arg)


def model_label(source) -> str:
    kind, value = source
    if kind == "gguf":
        return f"{value.parent.parent.name}/{value.name} (llama.cpp)" if value.parent.name == "gguf" else str(value)
    return f"recipe {value.name}: {value.model.name} (transformers)"


def open_writer(source):
    """The model that writes the replies: a GGUF through llama.cpp, or a recipe's model through transformers
    (app/generate.py), each with its own chat template."""
    from app.generate import GGUFModel, TransformersModel

    kind, value = source
    if kind == "gguf":
        # llama-cpp-python's batch threads default to every core, and on a machine that is busy with other work
        # they wait on each other: 90 replies of tiny took 22-41 s that way against 1.8 s with one thread each
        # (2 cores, another process using both); OMP_NUM_THREADS, when set, is honoured
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 2) // 2)
        return GGUFModel(value, threads=threads)
    from app.model import check_model_environment, import_unsloth, load_tokenizer, resolve_model_source

    import_unsloth()  # before transformers, as everywhere else
    check_model_environment(value)
    return TransformersModel.load(resolve_model_source(value), load_tokenizer(value))


def sampling(s: PairsSettings, seed: int) -> Sampling:
    return Sampling(max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=seed)


# one prompt: a pair, or the reason there is none

class Dropped(Exception):
    def __init__(self, reason: str, provenance: dict | None = None):
        super().__init__(reason)
        self.reason, self.provenance = reason, provenance or {}


def reward_pair(messages, writer, scorer, seed: int, s: PairsSettings, base: dict) -> dict:
    """Best and worst of s.samples replies by the reward model's score."""
    from app.evaluate import score_replies

    if not writer.fits(messages, s.max_new_tokens):
        raise Dropped("longer than the context")
    replies = list(dict.fromkeys(r for r in writer.replies(messages, sampling(s, seed), s.samples) if r))
    if len(replies) < 2:
        raise Dropped("fewer than 2 different replies")
    scores = score_replies(*scorer, messages, replies)
    best, worst = max(range(len(scores)), key=scores.__getitem__), min(range(len(scores)), key=scores.__getitem__)
    provenance = {**base, "seed": seed, "scores": [round(x, 4) for x in scores],
                  "chosen_score": round(scores[best], 4), "rejected_score": round(scores[worst], 4)}
    if scores[best] - scores[worst] < s.min_gap:
        raise Dropped(f"score gap below {s.min_gap}", provenance)
    if scores[best] == scores[worst]:
        raise Dropped("equal scores", provenance)
    return {"chosen": replies[best], "rejected": replies[worst], "provenance": provenance}


def constitution_pair(messages, writer, principle: dict, seed: int, s: PairsSettings, base: dict) -> dict:
    """The answer (rejected) and its revision after a critique against `principle` (chosen)."""
    provenance = {**base, "seed": seed, "principle": principle["name"]}
    conversation = list(messages)
    said = []
    for turn, request in enumerate((None, principle["critique_request"], principle["revision_request"])):
        if request:
            conversation += [{"role": "assistant", "content": said[-1]}, {"role": "user", "content": request}]
        if not writer.fits(conversation, s.max_new_tokens):
            raise Dropped("longer than the context", provenance)
        said.append(writer.replies(conversation, sampling(s, seed + turn))[0])
        if not said[-1]:
            raise Dropped(f"empty {('answer', 'critique', 'revision')[turn]}", provenance)
    answer, critique, revision = said
    provenance["critique"] = critique
    if revision == answer:
        raise Dropped("revision same as the answer", provenance)
    return {"chosen": revision, "rejected": answer, "provenance": provenance}


def write_lines(journal: Path, settings: dict, todo, s: PairsSettings, source, judge, principles):
    """Load the model (and the reward model), then one flushed journal line per prompt of `todo`."""
    from tqdm import tqdm

    writer = open_writer(source)
    base = {"mode": s.mode, "model": model_label(source)}
    if judge:
        from app.rewards import load_reward_run
        scorer = load_reward_run(judge)
        base["reward_run"] = judge.name
    new = not journal.exists()
    journal.parent.mkdir(parents=True, exist_ok=True)
    counts = collections.Counter()
    try:
        with open(journal, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=f"pairs ({s.mode})",
                                                              unit="prompt", file=sys.stderr) as bar:
            if new:
                append(f, {"pairs_settings": settings})
            for messages in todo:
                rng = random.Random(f"{s.seed}:{prompt_key(messages)}")  # the same for this prompt on any run
                seed = rng.randrange(2**31 - 8)
                try:
                    pair = (reward_pair(messages, writer, scorer, seed, s, base) if judge else
                            constitution_pair(messages, writer, rng.choice(principles), seed, s, base))
                    line = {"prompt": row_prompt(messages), **pair}
                    counts["pairs"] += 1
                except Dropped as e:
                    line = {"prompt": row_prompt(messages), "dropped": e.reason, "provenance": {**base, **e.provenance}}
                    counts["dropped"] += 1
                append(f, line)
                bar.update()
                bar.set_postfix(counts)
    except KeyboardInterrupt:
        print(f"stopped: what was done is kept in {journal}; run the same command again to continue",
              file=sys.stderr)
        raise
    finally:
        writer.close()


def append(f, line: dict):
    f.write(json.dumps(line, ensure_ascii=False) + "\n")
    f.flush()


# the journal and the end

def read_journal(journal: Path, settings: dict) -> dict:
    """{prompt key: line} of a journal left by a stopped run with the same settings ({} when there is
    none). A torn last line is cut off the file, so that the next line starts on its own."""
    if not journal.exists():
        return {}
    data = journal.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(journal, "r+b") as f:
            f.truncate(len(whole))
    lines = []
    for n, text in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            raise AppError(f"{journal} line {n} is damaged (not JSON); delete the file to start again") from None
    if not lines:
        return {}
    begun = lines[0].get("pairs_settings") if isinstance(lines[0], dict) else None
    if begun != settings:
        differ = ", ".join(f"{k} {begun.get(k)!r} (now {v!r})" for k, v in settings.items()
                           if begun.get(k) != v) if isinstance(begun, dict) else "no settings line"
        raise AppError(f"{journal} was begun with other settings: {differ}; rerun with those to continue it, or "
                       f"delete it to start again")
    return {prompt_key(as_messages(line["prompt"])): line for line in lines[1:]}


def finish(journal: Path, settings: dict, out: Path, prompts, skipped: int, seconds: float) -> dict:
    """OUT from the journal's pairs for `prompts` (atomically; the journal is removed), and the counts."""
    from app.runs import write_text

    lines = read_journal(journal, settings)
    lines = [lines[prompt_key(p)] for p in prompts]
    pairs = [line for line in lines if "dropped" not in line]
    write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in pairs))
    journal.unlink()
    return {"out": str(out), "prompts": len(prompts), "pairs": len(pairs), "skipped": skipped,
            "dropped": dict(collections.Counter(line["dropped"] for line in lines if "dropped" in line)),
            "seconds": round(seconds, 1)}


def format_counts(counts: dict) -> str:
    dropped = "; ".join(f"{n} {reason}" for reason, n in counts["dropped"].items()) or "none"
    return (f"prompts: {counts['prompts']} ({counts['skipped']} already done by an earlier run)\n"
            f"pairs written: {counts['pairs']} to {counts['out']}\n"
            f"dropped: {sum(counts['dropped'].values())} ({dropped})\n"
            f"done in {counts['seconds']:.0f}s")
