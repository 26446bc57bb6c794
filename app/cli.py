"""Command line: parse arguments, dispatch to the stage or the pipeline (app/pipeline.py), print results and
errors. Nothing else.

    python -m app dpo [RECIPE] [--set section.key=value ...]   recipe -> data -> model -> train -> export -> smoke
    python -m app sft|orpo|kto|reward [RECIPE] [--set ...]      the same with another method (reward: no export)
    python -m app grpo|rloo [RECIPE] [--set ...]                online RL against a reward run or reward functions
    python -m app train RECIPE                                  the recipe's stages, e.g. [sft, dpo]
    python -m app dpo --resume RUN                              continue an interrupted run from its checkpoint
    python -m app dpo RECIPE --processes N                      train in N processes (GPUs) under accelerate launch
    python -m app export [RUN]                                  adapter -> merged -> GGUF (from a run folder)
    python -m app smoke [RUN]                                   llama.cpp checks every GGUF of a run
    python -m app chat [RUN_OR_GGUF] [--quant q4_k_m]           chat with a GGUF
    python -m app compare [RUN] [--prompts FILE]                base vs aligned replies side by side
    python -m app pairs --prompts FILE --mode reward|constitution --out FILE [--model RUN_OR_GGUF_OR_RECIPE]
                        [--reward-run RUN] [--constitution FILE]  preference pairs from AI feedback
    python -m app serve [RUN_OR_GGUF] [--port 8000] [--api-key]  an OpenAI-compatible server for a GGUF
    python -m app ui [--port 8765]                              a local web app: label, train, runs, compare, chat
    python -m app data inspect SOURCE [--recipe R] [--json]     a dataset as the trainer will see it
    python -m app verify [RUN]                                  re-hash a run against its manifest
    python -m app report [RUN]                                  rebuild report.md, plots/ and the model cards of a run
    python -m app eval [RUN] [--tasks t1,t2] [--limit N] [--gguf [TYPE]]
                                                                lm-eval benchmarks, base against trained
    python -m app push [RUN] --repo USER/NAME [--gguf-only] [--private] [--dry-run]
                                                                upload merged/ and gguf/ to the Hugging Face hub
    python -m app runs [--sort COLUMN [--desc]] [--json]        one table of every run in exports/
    python -m app recipes                                       list the recipes
    python -m app preflight [--recipe R] [--set ...]            seconds of checks before training (dpo runs them)
    python -m app setup                                         fetch llama.cpp's converter (make setup does it)
    python -m app gpu-check [--dry-run]                         the whole GPU path on a tiny model, in minutes

What the user reads is printed; diagnostics go through `logging` to stderr: warnings always, `-v` adds
what each stage measured and did (INFO), `-vv` everything (DEBUG).
"""
import argparse
import dataclasses
import logging
import os
import signal
import sys
import typing
from pathlib import Path

from app import AppError
from app.generate import CONTEXT
from app.methods import METHODS, NOT_OFFERED


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="Preference alignment: DPO with Unsloth "
                                     "and TRL, export to GGUF, proven in llama.cpp, chat locally.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="diagnostics on stderr: -v, -vv for more")
    sub = parser.add_subparsers(dest="command", required=True)
    for method, what in (("train", "run the recipe's stages"), *((m.name, m.help) for m in METHODS.values())):
        p = sub.add_parser(method, help=f"{what}: train, export, smoke-test (the whole pipeline)")
        p.add_argument("recipe", nargs="?", default="tiny", help="a name in recipes/ or a path to a YAML file")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one key")
        p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its newest checkpoint")
        p.add_argument("--processes", type=int, default=1, metavar="N",
                       help="train in N processes (one per GPU) under accelerate launch: DDP, or the recipe's launch.config")
    p = sub.add_parser("train-worker", help="one process of a --processes N training (started by accelerate launch)")
    p.add_argument("run")
    p.add_argument("--checkpoint")
    p = sub.add_parser("score", help="score a reply with a reward run's model")
    p.add_argument("run", help="a reward run folder or name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--response", required=True, action="append", help="a reply to score (repeat to compare)")
    p = sub.add_parser("export", help="merge the adapter of a run and write its GGUF files")
    p.add_argument("run", nargs="?", default="latest")
    p = sub.add_parser("smoke", help="check every GGUF of a run against its merged model with llama.cpp")
    p.add_argument("run", nargs="?", default="latest")
    # what chat and serve share: which GGUF, and its context
    gguf = argparse.ArgumentParser(add_help=False)
    gguf.add_argument("target", nargs="?", default="latest", help="a run folder or name, or a .gguf file")
    gguf.add_argument("--quant", help="which GGUF of the run (f16, q8_0, q4_k_m, ...)")
    gguf.add_argument("--ctx", type=int, default=CONTEXT, help="context size in tokens (prompt, history and reply)")
    p = sub.add_parser("chat", parents=[gguf], help="chat with a run's GGUF (or a .gguf file)")
    p.add_argument("--system", help="a system prompt (default: the run's export.system; '' for none)")
    p.add_argument("--max-tokens", type=int, default=256, help="the longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("compare", help="the base and the aligned model's greedy replies, side by side")
    p.add_argument("run", nargs="?", default="latest")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: the recipe's export.probes)")
    p.add_argument("--max-tokens", type=int, default=128, help="the longest reply, in tokens")
    p.add_argument("--quant", help="which GGUF of the run is the aligned model (default: as chat)")
    p = sub.add_parser("pairs", help="preference pairs from AI feedback: a reward run's scores, or a constitution's "
                       "critique and revision")
    from app.pairs import PairsSettings
    for field in dataclasses.fields(PairsSettings):  # the flags, their defaults and help live in app/pairs.py
        required = field.default is dataclasses.MISSING
        extras = {k: v for k, v in field.metadata.items() if k != "help"}
        shown = "" if required or field.default is None else " (default: %(default)s)"
        p.add_argument("--" + field.name.replace("_", "-"), required=required, default=None if required else
                       field.default, type=next((t for t in typing.get_args(field.type) if t is not type(None)),
                                                field.type), help=field.metadata["help"] + shown, **extras)
    # what serve and the web app share: where they listen, and the key that anywhere beyond loopback needs
    listening = argparse.ArgumentParser(add_help=False)
    listening.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface, "
                                                               "which needs --api-key)")
    listening.add_argument("--api-key", default=os.environ.get("PREFALIGN_API_KEY"),
                           help="serve: every request sends it as `Authorization: Bearer KEY`; ui: the token in its "
                                "address (default: $PREFALIGN_API_KEY)")
    listening.add_argument("--insecure", action="store_true",
                           help="allow listening beyond this machine without an API key")
    p = sub.add_parser("serve", parents=[gguf, listening],
                       help="an OpenAI-compatible HTTP server for a run's GGUF (or a .gguf file)")
    p.add_argument("--port", type=int, default=8000)
    p = sub.add_parser("ui", parents=[listening],
                       help="a local web app: label pairs, train on them, read runs, compare, chat")
    p.add_argument("--port", type=int, default=8765)
    p = sub.add_parser("data", help="inspect a preference dataset as the trainer will see it")
    p.add_argument("action", choices=["inspect"])
    p.add_argument("source", help="a local file or folder, or a hub dataset id")
    p.add_argument("--recipe", help="render examples with this recipe's chat template; use its data settings")
    p.add_argument("--split", help="hub split (default: the recipe's, else train)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--dump", metavar="FILE", help="write the normalized rows (before templating) as JSONL")
    p = sub.add_parser("verify", help="re-hash a run's files against its manifest")
    p.add_argument("run", nargs="?", default="latest")
    p = sub.add_parser("report", help="rebuild a run's report.md, plots/ and model cards from its folder")
    p.add_argument("run", nargs="?", default="latest")
    p = sub.add_parser("eval", help="standard benchmarks (lm-evaluation-harness): the base and the trained model "
                       "on the same items, side by side in eval.json, report.md and `runs`")
    p.add_argument("run", nargs="?", default="latest")
    p.add_argument("--tasks", type=lambda text: [t for t in text.split(",") if t], metavar="T1,T2",
                   help="lm-eval task names or task YAML files (default: the run's recipe's eval.tasks, "
                        "eval.limit items of each)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N items of each task")
    p.add_argument("--gguf", nargs="?", const="", metavar="TYPE", help="also the run's GGUF (this type, else "
                   "the one chat uses) through llama-cpp-python's server: generation tasks only")
    p = sub.add_parser("push", help="upload a run's merged weights and GGUF files, with their model cards, to the hub")
    p.add_argument("run", nargs="?", default="latest")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the hub repository (created if needed); "
                   "NAME alone: under your own account")
    p.add_argument("--gguf-only", action="store_true", help="only gguf/ (at the repo's root), not the merged weights")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="list the files and their sizes; upload nothing")
    p = sub.add_parser("runs", help="one table of every run in exports/")
    p.add_argument("--sort", default="run", help="a column, e.g. accuracy_after (default: run, i.e. by time)")
    p.add_argument("--desc", action="store_true", help="sort descending")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    sub.add_parser("recipes", help="list the recipes")
    p = sub.add_parser("preflight", help="check versions, converter, tokenizer, data, disk and GPU memory in seconds")
    p.add_argument("--recipe", default="tiny", help="a name in recipes/ or a path to a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one key")
    sub.add_parser("setup", help="fetch llama.cpp's converter for the installed llama-cpp-python")
    p = sub.add_parser("gpu-check", help="the whole GPU path on a tiny random Llama-3-shaped model, in minutes")
    p.add_argument("--dry-run", action="store_true", help="the same path on the CPU (to test the check itself)")
    p.add_argument("--out", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--timeout", type=float, default=1800, help="seconds the pipeline may take (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the check's run folder in exports/ (about 0.7 GB)")
    command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    if command in NOT_OFFERED:  # before argparse, whose "invalid choice" would not say why
        print(f"error: {NOT_OFFERED[command]}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose < 2:  # the libraries' own INFO is for their developers, not for a user of this app
        for name in ("transformers", "datasets", "accelerate", "peft", "trl", "unsloth", "urllib3", "httpx",
                     "lm_eval"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not sys.stderr.isatty():  # progress bars garble logs and CI output; our own lines say the same
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started with Ctrl-C ignored, as a script's background job is (and its children after it): Stop in the
        # web app and Ctrl-C are SIGINT, and must still stop a run, which then says "interrupted"
        signal.signal(signal.SIGINT, signal.default_int_handler)
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
    from app.pipeline import train_recipe
    if args.processes < 1:
        raise AppError(f"--processes {args.processes}: the number of training processes is 1 or more")
    train_recipe(args.recipe, args.set, args.command, resume=args.resume, processes=args.processes)


def cmd_train_worker(args):
    from app.pipeline import train_worker
    train_worker(Path(args.run), Path(args.checkpoint) if args.checkpoint else None)


def cmd_score(args):
    from app.evaluate import score_replies
    from app.rewards import load_reward_run, reward_run

    model, tokenizer = load_reward_run(reward_run(args.run))
    for reward, response in zip(score_replies(model, tokenizer, args.prompt, args.response), args.response):
        print(f"{reward:+.4f}  {response}")


def cmd_export(args):
    from app.pipeline import export_run_folder
    from app.runs import resolve_run
    export_run_folder(resolve_run(args.run, write=True))


def cmd_smoke(args):
    from app.pipeline import check_run
    from app.recipe import run_recipe
    from app.runs import resolve_run

    run = resolve_run(args.run, write=True)
    check_run(run, run_recipe(run))


def cmd_chat(args):
    from app.chat import chat
    from app.gguf import find_gguf
    chat(find_gguf(args.target, args.quant), system=args.system, max_tokens=args.max_tokens,
         temperature=args.temperature, top_p=args.top_p, seed=args.seed, n_ctx=args.ctx)


def cmd_compare(args):
    from app.compare import compare_run
    from app.runs import resolve_run
    compare_run(resolve_run(args.run, write=True), args.prompts, max_tokens=args.max_tokens, quant=args.quant)


def cmd_pairs(args):
    from app.pairs import PairsSettings, format_counts, make_pairs
    print(format_counts(make_pairs(PairsSettings(**{f.name: getattr(args, f.name)
                                                    for f in dataclasses.fields(PairsSettings)}))))


def cmd_serve(args):
    from app.gguf import find_gguf
    from app.serve import serve
    serve(find_gguf(args.target, args.quant), host=args.host, port=args.port, n_ctx=args.ctx, api_key=args.api_key,
          insecure=args.insecure)


def cmd_ui(args):
    from app.ui import ui
    ui(host=args.host, port=args.port, api_key=args.api_key, insecure=args.insecure)


def cmd_data(args):
    import dataclasses
    import json

    from app.data import inspect_data
    from app.recipe import DataSection, load_recipe
    from app.runs import write_text

    recipe = load_recipe(args.recipe) if args.recipe else None
    data = dataclasses.replace(recipe.data if recipe else DataSection(), source=args.source,
                               **({"split": args.split} if args.split else {}))
    tokenizer = None
    if recipe:
        from app.model import load_tokenizer
        tokenizer = load_tokenizer(recipe)
    report, rows = inspect_data(data, tokenizer, recipe.methods["dpo"].get("max_length", 1024) if recipe else None)
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
    from app.pipeline import refresh_run_documents
    from app.runs import resolve_run, rewriting_finished_run

    run = resolve_run(args.run, write=True)
    if not (run / "train.json").is_file():
        raise AppError(f"{run.name} has no train.json and recipe.yaml: not a finished training run")
    with rewriting_finished_run(run):
        summary, cards = refresh_run_documents(run)
    print("\n".join(summary) + f"\nreport: {run / 'report.md'}")
    for card in cards:
        print(f"model card: {card}")


def cmd_eval(args):
    from app.benchmarks import evaluate_run
    from app.report import benchmark_lines
    from app.runs import resolve_run

    run = resolve_run(args.run, write=True)
    evals = evaluate_run(run, args.tasks, args.limit, args.gguf)
    print("\n".join(benchmark_lines(evals)[2:]) + f"\nsaved: {run / 'eval.json'}, {run / 'report.md'}")


def cmd_push(args):
    from app.push import push_run
    from app.runs import resolve_run
    push_run(resolve_run(args.run), args.repo, gguf_only=args.gguf_only, private=args.private, dry_run=args.dry_run)


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
    from app.memory import estimate_training_memory
    from app.recipe import load_recipe, recipe_names
    print(f"{'recipe':<18} {'model':<46} {'size':>6} {'GPU GiB':>7}  data   (GPU GiB: app/memory.py's estimate of "
          f"the training peak at the recipe's batch; `make preflight MODEL=...` says more)")
    for name in recipe_names():
        r = load_recipe(name)
        try:
            gpu = f"{estimate_training_memory(r).total:.1f}" + ("" if r.model.requires_gpu else "*")
        except ValueError:  # an architecture the planner does not know
            gpu = "?"
        print(f"{name:<18} {r.model.name:<46} {r.model.params or '?':>6} {gpu:>7}  {r.data.source}")
    print("* runs on the CPU as well")


def cmd_setup(args):
    from app.llamacpp import fetch_converter
    fetch_converter()


def cmd_gpu_check(args):
    from app.gpucheck import run_gpu_check
    report = run_gpu_check(dry_run=args.dry_run, out=args.out, timeout=args.timeout, keep=args.keep)
    if report["result"] != "PASS":
        raise AppError(f"gpu-check: {report['reason']}")


def cmd_preflight(args):
    from app.preflight import run_preflight
    from app.recipe import load_recipe
    run_preflight(load_recipe(args.recipe, args.set), log=print)


COMMANDS = {**{m: cmd_train for m in ("train", *METHODS)}, "train-worker": cmd_train_worker, "score": cmd_score, "export": cmd_export, "smoke": cmd_smoke, "chat": cmd_chat, "compare": cmd_compare, "pairs": cmd_pairs,
            "serve": cmd_serve, "ui": cmd_ui, "data": cmd_data, "verify": cmd_verify, "report": cmd_report, "eval": cmd_eval,
            "push": cmd_push, "runs": cmd_runs, "recipes": cmd_recipes, "setup": cmd_setup, "preflight": cmd_preflight,
            "gpu-check": cmd_gpu_check}

if __name__ == "__main__":
    sys.exit(main())
