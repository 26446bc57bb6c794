"""One method's run, stage by stage: data -> model -> train -> export -> smoke -> report -> manifest -> latest.

`train_recipe` chains a recipe's stages (each starts from the previous one's merged 16-bit weights) and
resumes an interrupted run; `run_stage` is one method's run; `export_run_folder` and `check_run` redo the
last stages of a finished run. Progress lines go to `log` (the CLI passes print); errors a user can fix
are AppError, as everywhere.
"""
import dataclasses
import json
import os
import time
from pathlib import Path

from app import AppError
from app.methods import METHODS
from app.progress import Progress


def train_recipe(recipe_arg: str, overrides, command: str, resume: str | None = None, processes: int = 1,
                 log=print) -> Path:
    """`train RECIPE` runs the recipe's stages; `sft|dpo|orpo|kto|reward|grpo|rloo RECIPE` runs that method (or
    the recipe's stages when they end with it: `dpo tiny-sft-dpo` runs sft, then dpo from its merged weights;
    grpo or rloo with no reward named trains a reward model first).
    `processes` > 1 trains each stage under accelerate launch (app/launch.py). Returns the last stage's
    run folder."""
    from app.memory import with_training_changes
    from app.preflight import run_preflight
    from app.recipe import check_stages, load_recipe

    progress = Progress()
    run, checkpoint = None, None
    if resume:  # the run's own recipe (one stage), its folder, its newest complete checkpoint
        from app.runs import last_checkpoint, resolve_run
        run = resolve_run(resume, write=True)
        if (run / "adapter").is_dir() or (run / "train.json").is_file():
            raise AppError(f"{run.name} finished training; to redo its export: python -m app export {run.name}")
        checkpoint = last_checkpoint(run)
        if checkpoint is None:
            raise AppError(f"{run.name} has no complete checkpoint to resume from (one is written every "
                           f"save_steps steps); start a new run")
    recipe = load_recipe(str(run / "recipe.yaml") if run else recipe_arg, overrides)
    with progress.stage("preflight"):
        checked = run_preflight(recipe, log=log)  # seconds of checks before any model loads
    recipe = with_training_changes(recipe, checked.changes)  # model.auto_fit's batch
    # a resumed run is one stage, its own method whichever command resumes it
    stages = recipe.stages if resume or command == "train" or recipe.stages[-1] == command else [command]
    if stages == [command] and METHODS[command].online and not (recipe.rewards.run or recipe.rewards.functions):
        log(f"{command} learns from a reward and recipe '{recipe.name}' names none (rewards.run, rewards.functions): "
            f"a reward model is trained first, on the pairs of {recipe.data.source} (the RLHF order)")
        stages = ["reward", command]
    check_stages(recipe, stages)
    if recipe.rewards.run and any(METHODS[s].online for s in stages):
        from app.rewards import reward_run
        reward_run(recipe.rewards.run)  # a reward run indeed, said before anything loads
    policy, scorer = None, None  # the last runs that trained the chat model and a reward model
    for i, stage in enumerate(stages):
        if policy:  # each stage starts from the previous chat model's merged 16-bit weights
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name=str(policy / "merged")))
        if METHODS[stage].online and scorer and not recipe.rewards.run:  # [sft, reward, grpo]: the reward stage's
            recipe = dataclasses.replace(recipe, rewards=dataclasses.replace(recipe.rewards, run=str(scorer)))
        if len(stages) > 1:
            log(f"stage {i + 1}/{len(stages)}: {stage}")
        run = run_stage(stage, dataclasses.replace(recipe, stages=[stage]), run if checkpoint else None, checkpoint,
                        processes, log=log, progress=progress)
        policy, scorer = (run, scorer) if METHODS[stage].chat_model else (policy, run)
    log(progress.line())
    log(f"done in {time.monotonic() - progress.start:.0f}s: {run}\n  report: {run / 'report.md'}")
    if METHODS[stages[-1]].chat_model:
        log(f"  chat with it: make chat   (or: python -m app chat {run.name})")
    return run


def run_stage(method: str, recipe, run=None, checkpoint=None, processes: int = 1, log=print,
              progress: Progress | None = None) -> Path:
    """recipe -> data -> model -> train -> export -> smoke for one method; returns the run folder. With
    `processes` > 1 the training runs under `accelerate launch` (app/launch.py), and this process exports
    and smoke-tests what its rank 0 saved. `progress` times the stages (app/progress.py)."""
    from app.model import import_unsloth
    progress = progress or Progress()
    with progress.stage("load"):
        import_unsloth()  # first: it patches transformers, TRL and PEFT on import (kto's data step imports TRL)
    from app.runs import write_json
    from app.train import train, training_summary_lines

    model = None
    if processes > 1:
        from app.launch import launch_training
        from app.model import check_model_environment
        check_model_environment(recipe)  # said once, here, rather than by every rank
        run = start_run(method, recipe, run, checkpoint, log)
        progress.event("run", "folder", path=str(run))  # for a process watching this one (the web app)
        with progress.stage("training"):
            launch_training(run, processes, recipe.launch.config, checkpoint, log)
        summary = json.loads((run / "train.json").read_text())
    else:
        with progress.stage("load"):
            data, source, model, tokenizer = load_stage(method, recipe, log)
        run = start_run(method, recipe, run, checkpoint, log)
        progress.event("run", "folder", path=str(run))
        summary = train(method, model, tokenizer, data, recipe, run, resume_from=checkpoint, progress=progress)
        write_json(run / "train.json", summary)
    for line in training_summary_lines(summary):
        log(line)
    if not METHODS[method].chat_model:  # a scorer: nothing to merge into a GGUF
        from app.report import write_report
        from app.runs import write_manifest
        with progress.stage("report"):
            for line in write_report(run):
                log(line)
            write_timings(run, progress)
            write_manifest(run)
        return run
    if model is None:  # trained in other processes: rank 0 saved the adapter (or the weights)
        export_run_folder(run, log=log, progress=progress)
        return run

    from app.export import export_run
    with progress.stage("export"):
        export_run(run, recipe, model, tokenizer, source, log=log)
    del model  # the smoke test loads the merged weights; the training model's memory goes back first
    check_run(run, recipe, log=log, progress=progress)
    return run


def load_stage(method: str, recipe, log=print):
    """(data, model source, model, tokenizer): the data and model stages of a method's run."""
    from app.model import import_unsloth
    import_unsloth()  # first: it patches transformers, TRL and PEFT on import (kto's data step imports TRL)
    from app.data import load_training_data
    from app.model import check_model_environment, load_model, load_reward_model, resolve_model_source

    check_model_environment(recipe)  # GPU, model files, network: said before anything is loaded
    data = load_training_data(recipe.data, method)
    dropped = "".join(f", {n} dropped ({reason})" for reason, n in data.dropped.items())
    log(f"data: {data.source} ({data.format}): {data.rows} rows{dropped} -> {len(data.train)} train, "
        f"{len(data.eval) if data.eval is not None else 0} held out")
    source = resolve_model_source(recipe)
    model, tokenizer = (load_model if METHODS[method].chat_model else load_reward_model)(recipe, source)
    return data, source, model, tokenizer


def start_run(method: str, recipe, run=None, checkpoint=None, log=print) -> Path:
    """The run folder (new, or the one a checkpoint belongs to) with the resolved recipe.yaml in it."""
    from app.recipe import save_recipe
    from app.runs import create_run

    if checkpoint:
        log(f"run folder: {run} (resuming from {checkpoint.name})")
    else:
        run = create_run(f"{recipe.name}-{method}")
        log(f"run folder: {run}")
    save_recipe(recipe, run / "recipe.yaml")
    return run


def train_worker(run: Path, checkpoint: Path | None = None):
    """One rank of a launched training stage (app/launch.py): the data, model and train stages of the run's
    recipe; rank 0 writes train.json. A failure leaves the one line the parent names the rank with."""
    from app.launch import load_cpu_rank_checkpoints, record_failure
    from app.recipe import run_recipe
    from app.runs import write_json
    from app.train import train

    rank = int(os.environ.get("RANK", "0"))
    load_cpu_rank_checkpoints()
    try:
        recipe = run_recipe(run)
        method = recipe.stages[0]
        data, _, model, tokenizer = load_stage(method, recipe, log=print if rank == 0 else (lambda *a: None))
        summary = train(method, model, tokenizer, data, recipe, run, resume_from=checkpoint)
        if summary is not None:  # rank 0
            write_json(run / "train.json", summary)
    except BaseException as e:
        record_failure(run, e)
        raise


def export_run_folder(run: Path, log=print, progress: Progress | None = None):
    """`export RUN`: the run's base and adapter reloaded through Unsloth, then export and smoke."""
    from app.export import export_run
    from app.model import load_trained_model, resolve_model_source
    from app.recipe import run_recipe

    recipe = run_recipe(run)
    # what training saved: the adapter, or for full fine-tuning the trained weights themselves, which the
    # export wrote in 16 bits (merged/ appears only complete)
    full = recipe.model.full_finetuning
    trained = run / ("merged" if full else "adapter")
    if not trained.is_dir():
        raise AppError(f"{run.name} has no {trained.name}/ (its training did not finish"
                       + (", or its export did not, and full fine-tuning keeps the trained weights nowhere else but "
                          "its checkpoints: train it again" if full else "") + ")")
    if not METHODS[recipe.stages[-1]].chat_model:
        raise AppError(f"{run.name} is a reward model: a scorer, not a chat model, so it has no GGUF export "
                       f"(use it with: python -m app score {run.name} --prompt ... --response ...)")
    progress = progress or Progress()
    with progress.stage("export"):
        model, tokenizer = load_trained_model(recipe, trained)
        export_run(run, recipe, model, tokenizer, resolve_model_source(recipe), log=log)
    del model
    check_run(run, recipe, log=log, progress=progress)


def check_run(run: Path, recipe, log=print, progress: Progress | None = None):
    """llama.cpp against the merged model, then the report, the model cards, timings.json and the manifest
    (written last, naming them all); `latest` moves only when every GGUF passes."""
    import gc

    import torch
    from app.runs import mark_latest, write_manifest
    from app.smoke import smoke_run

    progress = progress or Progress()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log("smoke: llama.cpp against the merged model")
    with progress.stage("smoke"):
        results = smoke_run(run, recipe.export.probes, log=log)
    with progress.stage("report"):
        summary, _ = refresh_run_documents(run)  # before the manifest, which names them too
        write_timings(run, progress)
        write_manifest(run)
    for line in summary:
        log(line)
    failed = [r for r in results if not r["passed"]]
    if failed:
        raise AppError("smoke test failed: " + "; ".join(f"{r['file']}: {r['reason']}" for r in failed))
    mark_latest(run)


def refresh_run_documents(run: Path) -> tuple[list[str], list[Path]]:
    """report.md (with plots/) and the model cards, rebuilt from the run folder alone: (the report's summary
    lines, the cards written); nothing for a folder without train.json. A command that changes a finished
    run calls it inside runs.rewriting_finished_run, which writes the manifest again afterwards."""
    from app.card import write_model_card
    from app.report import write_report

    if not (run / "train.json").is_file():
        return [], []
    return write_report(run), write_model_card(run)


def write_timings(run: Path, progress: Progress):
    """timings.json: the wall seconds of each stage this command ran (a re-export has only its own), the
    stage writing it included."""
    from app.runs import write_json
    write_json(run / "timings.json", progress.so_far())
