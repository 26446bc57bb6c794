"""Standard benchmarks: EleutherAI's lm-evaluation-harness on a run's merged model and on the base model it
started from, the same tasks and the same items, side by side (`python -m app eval RUN`).

Both go through lm-eval's Python API (`simple_evaluate`, its "hf" model: transformers on the model's own
dtype, on the GPU when there is one). A task is one of lm-eval's names (its data comes from the Hugging Face
hub on first use, then from the cache) or the path of a task YAML of your own, e.g. one over a local JSONL
(`dataset_path: json`, `dataset_kwargs: {data_files: ...}`; tests/lm_eval_tasks/ has two).

`--gguf [TYPE]` adds the run's GGUF, served by llama-cpp-python's OpenAI-compatible server and measured with
lm-eval's `local-completions` model, on generation tasks only. Multiple-choice (log-likelihood) tasks need
the server to echo the prompt's log-probs: it does, but (1) it builds each token's top log-probs by sorting
the whole vocabulary in Python, 0.13 s a token at 128k tokens (measured), so truthfulqa_mc2 would take days;
(2) lm-eval drops the last echoed token as the one generated, and where the model's next token is its end
of text the server generates none, so the continuation's last token is lost (a one-token answer scores 0).

RUN/eval.json: `results` (the trained model, lm-eval's {task: {metric: value}}, which the model cards show),
`base_results`, `gguf_results`; `items`, per model and task, the count and a hash of lm-eval's doc ids and
prompt hashes (the same hash means the same items); tasks, limit, seconds, lm_eval's version. report.md
shows it as a table, `runs` as a column.
"""
import difflib
import hashlib
import json
import os
import re
import time
from pathlib import Path

from app import AppError

# The default tasks (the recipe's eval section, app/recipe.py) and what each costs per model. An ESTIMATE, not
# measured: items x answers x tokens x 2 FLOPs per parameter, for an 8B model at an effective 100 TFLOP/s (one
# A100-class GPU in bf16); base and trained take twice that, plus loading each model.
TASK_COST = {
    "truthfulqa_mc2": "817 questions (all) x ~7 answers x ~150 tokens with its 6-shot primer: ~2.5 min",
    "arc_easy": "1,000 of 2,376 questions x 4 answers x ~40 tokens: ~0.5 min",
    "hellaswag": "1,000 of 10,042 contexts x 4 endings x ~100 tokens: ~1 min",
}
LOCAL_TASK_EXAMPLE = "tests/lm_eval_tasks/tiny_qa.yaml"


def evaluate_run(run: Path, tasks: list[str] | None = None, limit: int | None = None, gguf: str | None = None,
                 log=print) -> dict:
    """lm-eval on RUN/merged and on its base (and on a GGUF: `gguf` "" for the default one, or a type);
    writes eval.json, then the report, the model cards and the manifest again. Returns eval.json's content."""
    from app.gguf import find_gguf
    from app.pipeline import refresh_run_documents
    from app.recipe import run_recipe
    from app.runs import rewriting_finished_run, write_json

    if not (run / "merged" / "config.json").is_file():
        raise AppError(f"{run.name} has no merged model (merged/): a reward run, or its export did not finish; "
                       f"export it with: python -m app export {run.name}")
    if limit is not None and limit <= 0:
        raise AppError(f"--limit {limit} must be a positive number of items")
    recipe = run_recipe(run)
    if not tasks:  # the recipe's eval section (its defaults: app/recipe.py EvalSection)
        tasks, limit = list(recipe.eval.tasks), limit or recipe.eval.limit
    go_offline_without_hub()  # before lm-eval imports datasets, which reads these settings once
    manager = task_manager(tasks)
    loaded = load_tasks(manager, tasks)
    names = [name for kinds in loaded.values() for name in kinds]
    base, base_source = recipe.model.name, base_model_source(recipe)
    gguf_file = find_gguf(str(run), gguf or None) if gguf is not None else None
    what = f"first {limit} items" if limit else "every item"
    log(f"eval: {', '.join(names)} ({what} of each) with lm-eval; trained: {run.name}/merged; base: {base_source}")

    out = {"lm_eval_version": lm_eval_version(), "tasks": names, "limit": limit, "trained": "merged",
           "base": base, "seconds": {}, "items": {}}
    for key, source in (("trained", str(run / "merged")), ("base", base_source)):
        t0 = time.monotonic()
        r = run_lm_eval(manager, tasks, limit, "hf", hf_args(source))
        out["seconds"][key] = round(time.monotonic() - t0, 1)
        out["results" if key == "trained" else "base_results"] = {t: metrics(m) for t, m in r["results"].items()}
        out["items"][key] = items(r["samples"])
        log(f"{key}: {out['seconds'][key]:.0f} s")
    if gguf_file:
        generation = [spec for spec, kinds in loaded.items() if set(kinds.values()) == {"generate_until"}]
        if not generation:
            log("GGUF: skipped, none of these tasks generates text; lm-eval's multiple-choice tasks cannot be "
                "measured through llama-cpp-python's server (app/benchmarks.py says why)")
        else:
            from app.serve import background_server
            t0 = time.monotonic()
            with background_server(gguf_file) as url:
                r = run_lm_eval(manager, generation, limit, "local-completions", {
                    "base_url": f"{url}/completions", "model": gguf_file.name, "tokenizer": str(run / "merged"),
                    "tokenizer_backend": "huggingface", "tokenized_requests": False,  # the server takes text
                    "batch_size": 1})  # one prompt a request: the server answers a list with its first prompt
            out["seconds"]["gguf"] = round(time.monotonic() - t0, 1)
            out["gguf"], out["gguf_results"] = gguf_file.name, {t: metrics(m) for t, m in r["results"].items()}
            out["items"]["gguf"] = items(r["samples"])
            log(f"GGUF {gguf_file.name}: {out['seconds']['gguf']:.0f} s")

    with rewriting_finished_run(run):
        write_json(run / "eval.json", out)
        refresh_run_documents(run)
    return out


def go_offline_without_hub():
    """Without a reachable hub, datasets and huggingface_hub are told so (HF_*_OFFLINE), so that a task whose
    data is not cached fails at once, not after a minute of retries; cached data still loads."""
    from app.model import hub_reachable, offline
    if not offline() and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


def load_tasks(manager, tasks: list[str]) -> dict[str, dict[str, str]]:
    """{spec: {task name: output type}} for the tasks lm-eval builds from each of `tasks` (a group gives its
    subtasks); their data is loaded here, so what is missing is said before any model loads."""
    loaded = {}
    for spec in tasks:
        if spec.endswith((".yaml", ".yml")) and not Path(spec).is_file():
            raise AppError(f"task file {spec} does not exist")
        try:
            built = manager.load([spec])["tasks"]
        except KeyError:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=1)
            raise AppError(f"'{spec}' is neither an lm-eval task nor a task YAML file"
                           + (f"; did you mean '{close[0]}'?" if close else "")) from None
        except ConnectionError as e:  # datasets' own, offline or not: "Couldn't reach 'org/name' on the Hub (...)"
            dataset = re.search(r"reach '([^']+)'", str(e))
            needs = f"the dataset {dataset[1]}" if dataset else "its dataset"
            raise AppError(f"task '{spec}' needs {needs} from the Hugging Face hub, which is not in the local cache "
                           f"and cannot be reached; fix: run it once with network, or give a local task YAML with "
                           f"--tasks (e.g. {LOCAL_TASK_EXAMPLE})") from None
        except FileNotFoundError as e:  # a local data file that is not there
            raise AppError(f"task '{spec}': {e}") from None
        loaded[spec] = {name: task.get_config("output_type") for name, task in built.items()}
    return loaded


def task_manager(tasks: list[str]):
    """lm-eval's TaskManager; its own task index (8 s to build) only when a task is named, not a file."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_defaults=not all(t.endswith((".yaml", ".yml")) for t in tasks))


def base_model_source(recipe) -> str:
    """The model the run started from (recipe.yaml's model.name): a built model's folder, a local folder or a
    hub id, which must be cached when the hub cannot be reached."""
    from app.model import BUILT, local_model_folder, offline, resolve_model_source

    name = recipe.model.name
    if name not in BUILT and local_model_folder(name) is None and offline():
        raise AppError(f"the base model '{name}' is not in the local Hugging Face cache and the hub cannot be "
                       f"reached, so it cannot be evaluated beside the trained one")
    return resolve_model_source(recipe)  # a built model: built first if its cache is gone


def hf_args(source: str) -> dict:
    import torch
    on_gpu = torch.cuda.is_available()
    return {"pretrained": source, "dtype": "auto", "device": "cuda" if on_gpu else "cpu",
            "batch_size": "auto" if on_gpu else 8}  # auto: the largest batch that fits, found by trying


def run_lm_eval(manager, tasks: list[str], limit: int | None, model: str, model_args: dict) -> dict:
    import lm_eval
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager, limit=limit,
                                   log_samples=True)  # the samples say which items were evaluated


def metrics(task_results: dict) -> dict:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} as {"acc": 0.5, "acc_stderr": 0.1}; a
    filter other than "none" stays in the name: "exact_match (strict-match)"."""
    out = {}
    for key, value in task_results.items():
        metric, _, where = key.partition(",")
        if where and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric if where == "none" else f"{metric} ({where})"] = value
    return out


def items(samples: dict) -> dict:
    """Per task: how many items were evaluated, and a hash of which (lm-eval's doc id and prompt hash of each)."""
    return {task: {"count": len(rows), "sha256": hashlib.sha256(json.dumps(
        sorted((s["doc_id"], s["prompt_hash"]) for s in rows)).encode()).hexdigest()[:16]}
        for task, rows in samples.items()}


def lm_eval_version() -> str:
    import importlib.metadata
    return importlib.metadata.version("lm_eval")
