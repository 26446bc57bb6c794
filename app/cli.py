"""Command line: parse arguments, wire the stages together, print errors. Nothing else.

    python -m app dpo [RECIPE] [--set section.key=value ...]   recipe -> data -> model -> train -> export -> smoke
    python -m app sft|orpo|kto|reward [RECIPE] [--set ...]      the same with another method (reward: no export)
    python -m app train RECIPE                                  the recipe's stages, e.g. [sft, dpo]
    python -m app dpo --resume RUN                              continue an interrupted run from its checkpoint
    python -m app export [RUN]                                  adapter -> merged -> GGUF (from a run folder)
    python -m app smoke [RUN]                                   llama.cpp checks every GGUF of a run
    python -m app chat [RUN_OR_GGUF] [--quant q4_k_m]           chat with a GGUF
    python -m app compare [RUN] [--prompts FILE]                base vs aligned replies side by side
    python -m app serve [RUN_OR_GGUF] [--port 8000]             an OpenAI-compatible server for a GGUF
    python -m app data inspect SOURCE [--recipe R] [--json]     a dataset as the trainer will see it
    python -m app verify [RUN]                                  re-hash a run against its manifest
    python -m app report [RUN]                                  rebuild report.md and plots/ of a run
    python -m app runs [--sort COLUMN [--desc]] [--json]        one table of every run in exports/
    python -m app recipes                                       list the recipes
    python -m app preflight [--recipe R] [--set ...]            seconds of checks before training (dpo runs them)
    python -m app setup                                         fetch llama.cpp's converter (make setup does it)
"""
import argparse
import os
import sys
import time
from pathlib import Path

from app import AppError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="Preference alignment: DPO with Unsloth "
                                     "and TRL, export to GGUF, proven in llama.cpp, chat locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    for method, what in (("train", "run the recipe's stages"), ("sft", "supervised fine-tuning"),
                         ("dpo", "DPO"), ("orpo", "ORPO (no reference model)"), ("kto", "KTO (unpaired data)"),
                         ("reward", "a reward model (no export)")):
        p = sub.add_parser(method, help=f"{what}: train, export, smoke-test (the whole pipeline)")
        p.add_argument("recipe", nargs="?", default="tiny", help="a name in recipes/ or a path to a YAML file")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one key")
        p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its newest checkpoint")
    p = sub.add_parser("score", help="score a reply with a reward run's model")
    p.add_argument("run", help="a reward run folder or name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--response", required=True, action="append", help="a reply to score (repeat to compare)")
    p = sub.add_parser("export", help="merge the adapter of a run and write its GGUF files")
    p.add_argument("run", nargs="?", default="latest")
    p = sub.add_parser("smoke", help="check every GGUF of a run against its merged model with llama.cpp")
    p.add_argument("run", nargs="?", default="latest")
    p = sub.add_parser("chat", help="chat with a run's GGUF (or a .gguf file)")
    p.add_argument("target", nargs="?", default="latest", help="a run folder or name, or a .gguf file")
    p.add_argument("--quant", help="which GGUF of the run (f16, q8_0, q4_k_m, ...)")
    p.add_argument("--system", help="a system prompt (default: the run's export.system; '' for none)")
    p.add_argument("--max-tokens", type=int, default=256, help="the longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ctx", type=int, default=2048, help="context size in tokens; older turns drop out to fit")
    p = sub.add_parser("compare", help="the base and the aligned model's greedy replies, side by side")
    p.add_argument("run", nargs="?", default="latest")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: the recipe's export.probes)")
    p.add_argument("--max-tokens", type=int, default=128, help="the longest reply, in tokens")
    p.add_argument("--quant", help="which GGUF of the run is the aligned model (default: as chat)")
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run's GGUF (or a .gguf file)")
    p.add_argument("target", nargs="?", default="latest", help="a run folder or name, or a .gguf file")
    p.add_argument("--quant", help="which GGUF of the run (f16, q8_0, q4_k_m, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ctx", type=int, default=2048, help="context size in tokens (prompt and reply)")
    p = sub.add_parser("data", help="inspect a preference dataset as the trainer will see it")
    p.add_argument("action", choices=["inspect"])
    p.add_argument("source", help="a local file or folder, or a hub dataset id")
    p.add_argument("--recipe", help="render examples with this recipe's chat template; use its data settings")
    p.add_argument("--split", help="hub split (default: the recipe's, else train)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--dump", metavar="FILE", help="write the normalized rows (before templating) as JSONL")
    p = sub.add_parser("verify", help="re-hash a run's files against its manifest")
    p.add_argument("run", nargs="?", default="latest")
    p = sub.add_parser("report", help="rebuild a run's report.md and plots/ from its folder")
    p.add_argument("run", nargs="?", default="latest")
    p = sub.add_parser("runs", help="one table of every run in exports/")
    p.add_argument("--sort", default="run", help="a column, e.g. accuracy_after (default: run, i.e. by time)")
    p.add_argument("--desc", action="store_true", help="sort descending")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    sub.add_parser("recipes", help="list the recipes")
    p = sub.add_parser("preflight", help="check versions, converter, tokenizer, data, disk and GPU memory in seconds")
    p.add_argument("--recipe", default="tiny", help="a name in recipes/ or a path to a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one key")
    sub.add_parser("setup", help="fetch llama.cpp's converter for the installed llama-cpp-python")
    args = parser.parse_args(argv)
    if not sys.stderr.isatty():  # progress bars garble logs and CI output; our own lines say the same
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        COMMANDS[args.command](args)
        return 0
    except AppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_train(args):
    """`train RECIPE` runs the recipe's stages; `sft|dpo|orpo|kto|reward RECIPE` runs that method (or the
    recipe's stages when they end with it: `dpo tiny-sft-dpo` runs sft, then dpo from its merged weights)."""
    import dataclasses

    from app.recipe import load_recipe

    t0 = time.time()
    run, checkpoint = None, None
    if args.resume:  # the run's own recipe (one stage), its folder, its newest complete checkpoint
        from app.runs import last_checkpoint, resolve_run
        run = resolve_run(args.resume, write=True)
        if (run / "adapter").is_dir():
            raise AppError(f"{run.name} finished training; to redo its export: python -m app export {run.name}")
        checkpoint = last_checkpoint(run)
        if checkpoint is None:
            raise AppError(f"{run.name} has no complete checkpoint to resume from (one is written every "
                           f"save_steps steps); start a new run")
    recipe = load_recipe(str(run / "recipe.yaml") if run else args.recipe, args.set)
    from app.preflight import run_preflight
    run_preflight(recipe, log=print)  # seconds of checks before any model loads; model.auto_fit sets the batch
    method = args.command
    # a resumed run is one stage, its own method whichever command resumes it
    stages = recipe.stages if args.resume or method == "train" or recipe.stages[-1] == method else [method]
    for i, stage in enumerate(stages):
        if i:  # each stage starts from the previous one's merged 16-bit weights
            recipe = dataclasses.replace(recipe, model={**recipe.model, "name": str(run / "merged")})
        if len(stages) > 1:
            print(f"stage {i + 1}/{len(stages)}: {stage}")
        run = run_stage(stage, dataclasses.replace(recipe, stages=[stage]), run if checkpoint else None, checkpoint)
    print(f"done in {time.time() - t0:.0f}s: {run}\n  report: {run / 'report.md'}")
    if stages[-1] != "reward":
        print(f"  chat with it: make chat   (or: python -m app chat {run.name})")


def run_stage(method: str, recipe, run=None, checkpoint=None):
    """recipe -> data -> model -> train -> export -> smoke for one method; returns the run folder."""
    from app.model import import_unsloth
    import_unsloth()  # first: it patches transformers, TRL and PEFT on import (kto's data step imports TRL)
    from app.data import load_training_data
    from app.model import check_model_environment, load_model, load_reward_model, resolve_model_source
    from app.recipe import save_recipe
    from app.runs import create_run, write_json
    from app.train import train

    check_model_environment(recipe)  # GPU, model files, network: said before anything is loaded
    data = load_training_data(recipe.data, method)
    dropped = "".join(f", {n} dropped ({reason})" for reason, n in data.dropped.items())
    print(f"data: {data.source} ({data.format}): {data.rows} rows{dropped} -> {len(data.train)} train, "
          f"{len(data.eval) if data.eval is not None else 0} held out")
    source = resolve_model_source(recipe)
    model, tokenizer = (load_reward_model if method == "reward" else load_model)(recipe, source)

    if checkpoint:
        print(f"run folder: {run} (resuming from {checkpoint.name})")
    else:
        run = create_run(f"{recipe.name}-{method}")
        print(f"run folder: {run}")
    save_recipe(recipe, run / "recipe.yaml")
    summary = train(method, model, tokenizer, data, recipe, run, resume_from=checkpoint)
    write_json(run / "train.json", summary)
    print_training_summary(summary)
    if method == "reward":  # a scorer, not a chat model: nothing to merge into a GGUF
        from app.report import write_report
        from app.runs import write_manifest
        print_report_summary(write_report(run))
        write_manifest(run)
        return run

    from app.export import export_run
    export_run(run, recipe, model, tokenizer, source)
    del model  # the smoke test loads the merged weights; the training model's memory goes back first
    smoke(run, recipe)
    return run


def cmd_score(args):
    import json

    from app.evaluate import score_replies
    from app.recipe import load_recipe
    from app.runs import resolve_run

    run = resolve_run(args.run)
    train = run / "train.json"
    if not train.is_file() or json.loads(train.read_text()).get("method") != "reward":
        raise AppError(f"{run.name} is not a finished reward run (train one with: make reward)")
    recipe = load_recipe(str(run / "recipe.yaml"))
    from app.model import import_unsloth, load_trained_reward_model
    import_unsloth()  # before transformers and PEFT, as everywhere else
    model, tokenizer = load_trained_reward_model(recipe, run / "adapter")
    for reward, response in zip(score_replies(model, tokenizer, args.prompt, args.response), args.response):
        print(f"{reward:+.4f}  {response}")


def smoke(run, recipe):
    """llama.cpp against the merged model, then the report and the manifest (written last);
    `latest` moves only when every GGUF passes."""
    import gc

    import torch
    from app.report import write_report
    from app.runs import mark_latest, write_manifest
    from app.smoke import smoke_run

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print("smoke: llama.cpp against the merged model")
    results = smoke_run(run, recipe.export["probes"])
    report = write_report(run) if (run / "train.json").is_file() else None
    write_manifest(run)
    if report:
        print_report_summary(report)
    failed = [r for r in results if not r["passed"]]
    if failed:
        raise AppError("smoke test failed: " + "; ".join(f"{r['file']}: {r['reason']}" for r in failed))
    mark_latest(run)


def cmd_export(args):
    from app.export import export_run
    from app.model import load_trained_model, resolve_model_source
    from app.recipe import load_recipe
    from app.runs import resolve_run

    run = resolve_run(args.run, write=True)
    if not (run / "adapter").is_dir():
        raise AppError(f"{run.name} has no adapter/ (its training did not finish)")
    recipe = load_recipe(str(run / "recipe.yaml"))
    if recipe.stages == ["reward"]:
        raise AppError(f"{run.name} is a reward model: a scorer, not a chat model, so it has no GGUF export "
                       f"(use it with: python -m app score {run.name} --prompt ... --response ...)")
    model, tokenizer = load_trained_model(recipe, run / "adapter")
    export_run(run, recipe, model, tokenizer, resolve_model_source(recipe))
    del model
    smoke(run, recipe)


def cmd_smoke(args):
    from app.recipe import load_recipe
    from app.runs import resolve_run

    run = resolve_run(args.run, write=True)
    smoke(run, load_recipe(str(run / "recipe.yaml")))


def cmd_chat(args):
    from app.chat import chat, find_gguf
    chat(find_gguf(args.target, args.quant), system=args.system, max_tokens=args.max_tokens,
         temperature=args.temperature, top_p=args.top_p, seed=args.seed, n_ctx=args.ctx)


def cmd_compare(args):
    from app.compare import compare_run
    from app.runs import resolve_run
    compare_run(resolve_run(args.run, write=True), args.prompts, max_tokens=args.max_tokens, quant=args.quant)


def cmd_serve(args):
    from app.chat import find_gguf
    from app.serve import serve
    serve(find_gguf(args.target, args.quant), host=args.host, port=args.port, n_ctx=args.ctx)


def cmd_data(args):
    import json

    from app.data import inspect_data
    from app.recipe import load_recipe
    from app.runs import write_text

    recipe = load_recipe(args.recipe) if args.recipe else None
    data = {**(recipe.data if recipe else {}), "source": args.source}
    if args.split:
        data["split"] = args.split
    tokenizer = None
    if recipe:
        from app.model import load_tokenizer
        tokenizer = load_tokenizer(recipe)
    report, rows = inspect_data(data, tokenizer, recipe.dpo.get("max_length", 1024) if recipe else None)
    if args.dump:
        write_text(Path(args.dump), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if args.json:
        print(json.dumps(report))
        return
    print(f"source: {report['source']}\nformat: {report['format']}\n"
          f"kept {report['rows_kept']} of {report['rows_read']} rows")
    for reason, n in report["dropped"].items():
        print(f"  dropped  {n:>6}  {reason}")
    if "longer_than_max_length" in report:
        print(f"  longer than max_length {report['max_length']} tokens (truncated in training): "
              f"{report['longer_than_max_length']}")
    for i, row in enumerate(rows[:2] if tokenizer else [], 1):
        for side in ("chosen", "rejected"):
            text = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            print(f"\n--- example {i}, prompt + {side}, as the trainer sees it ---\n{text}")


def cmd_verify(args):
    from app.runs import resolve_run, verify_run

    run = resolve_run(args.run)
    problems = verify_run(run)
    if problems:
        raise AppError(f"{run.name} does not match its manifest: " + "; ".join(problems))
    print(f"{run.name}: every file matches manifest.json")


def cmd_report(args):
    from app.report import write_report
    from app.runs import resolve_run, rewriting_finished_run

    run = resolve_run(args.run, write=True)
    with rewriting_finished_run(run):
        report = write_report(run)
    print_report_summary(report)
    print(f"report: {report}")


def cmd_runs(args):
    import json

    from app.report import format_runs_table, list_runs

    rows = list_runs(args.sort, args.desc)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print("no trained runs in exports/ yet; run `make dpo` first")
    else:
        print(format_runs_table(rows))


def cmd_recipes(args):
    from app.recipe import load_recipe, recipe_names
    print(f"{'recipe':<13} {'model':<46} {'size':>5} {'GPU GB':>6}  data")
    for name in recipe_names():
        r = load_recipe(name)
        gpu = f"{r.model['gpu_memory_gb']}" if r.model.get("requires_gpu") else "none"
        print(f"{name:<13} {r.model['name']:<46} {r.model.get('params') or '?':>5} {gpu:>6}  {r.data['source']}")


def cmd_setup(args):
    from app.llamacpp import fetch_converter
    fetch_converter()


def cmd_preflight(args):
    from app.preflight import run_preflight
    from app.recipe import load_recipe
    run_preflight(load_recipe(args.recipe, args.set), log=print)


def print_training_summary(s: dict):
    from app.train import ACCURACY_KEYS, MARGIN_KEYS
    method = s.get("method", "dpo").upper()
    before, after = s["preference"]["base"], s["preference"]["trained"]
    if after.get("pairs"):
        what = "reward model score" if method == "REWARD" else "log-prob"
        print(f"held-out preference accuracy ({what}, {after['pairs']} pairs): {before['accuracy']:.0%} before "
              f"-> {after['accuracy']:.0%} after; margin {before['margin']:+.2f} -> {after['margin']:+.2f}")
    ev = s["eval"]
    acc = next((ev[f"eval_{k}"] for k in ACCURACY_KEYS if f"eval_{k}" in ev), None)
    margin = next((ev[f"eval_{k}"] for k in MARGIN_KEYS if f"eval_{k}" in ev), None)
    if ev:
        print(f"held-out {method} loss {ev.get('eval_loss', 0):.4f}" + (f", accuracy {acc:.2f}" if acc is not None else "")
              + (f", margin {margin:+.3f}" if margin is not None else ""))
    for r in s["replies"]:
        print(f"prompt: {r['prompt']}\n  before {method}: {r['before']}\n  after {method}:  {r['after']}")


def print_report_summary(report: Path):
    """The report's five summary lines."""
    lines = report.read_text().splitlines()
    for line in [line for line in lines if line.startswith("- ")][:5]:
        print(line[2:])


COMMANDS = {**{m: cmd_train for m in ("train", "sft", "dpo", "orpo", "kto", "reward")}, "score": cmd_score, "export": cmd_export, "smoke": cmd_smoke, "chat": cmd_chat, "compare": cmd_compare,
            "serve": cmd_serve, "data": cmd_data, "verify": cmd_verify, "report": cmd_report, "runs": cmd_runs,
            "recipes": cmd_recipes, "setup": cmd_setup, "preflight": cmd_preflight}

if __name__ == "__main__":
    sys.exit(main())
