"""Rewards: a finished reward run (its folder, its model) and the reward functions a recipe names, for the
online methods (grpo, rloo), `score` and AI-feedback pairs.
"""
import json
import logging
from pathlib import Path

from app import AppError, repo_path
from app.recipe import run_recipe

logger = logging.getLogger(__name__)


def reward_run(arg: str) -> Path:
    """The folder of a finished reward run (`python -m app reward`): a run folder, a name in exports/ or
    `latest`. AppError for any other run: only a reward run's model scores replies. Reads train.json only."""
    from app.runs import resolve_run

    run = resolve_run(arg)
    train = run / "train.json"
    if not train.is_file() or json.loads(train.read_text()).get("method") != "reward":
        raise AppError(f"{run.name} is not a finished reward run (train one with: make reward)")
    return run


def load_reward_run(run: Path):
    """(model, tokenizer) of a reward run that reward_run accepted, for score_replies."""
    from app.model import import_unsloth, load_trained_reward_model

    recipe = run_recipe(run)
    import_unsloth()  # before transformers and PEFT, as everywhere else
    return load_trained_reward_model(recipe, run / "adapter")


def load_rewards(recipe) -> tuple[list, list]:
    """grpo's and rloo's reward (TRL's reward_funcs and reward_processing_classes): the reward run's model,
    its adapter merged into its base (a plain sequence classifier, which TRL scores each reply with through
    its own tokenizer), then the functions of rewards.functions; TRL adds their scores."""
    funcs, tokenizers = [], []
    if recipe.rewards.run:
        scorer, tokenizer = load_reward_run(reward_run(recipe.rewards.run))
        funcs.append(scorer.merge_and_unload())
        tokenizers.append(tokenizer)
    if recipe.rewards.functions:
        found = load_reward_functions(repo_path(recipe.rewards.functions))
        funcs += found
        tokenizers += [None] * len(found)
    return funcs, tokenizers


def load_reward_functions(path: Path) -> list:
    """The top-level functions a Python file defines (not those it imports; not _private ones), in order.
    Its code runs: said on stderr first, as trust_remote_code is."""
    import importlib.util
    import inspect

    logger.warning(f"rewards.functions runs the Python code in {path} on this machine (its reward functions); "
                   f"keep it only for code you trust")
    spec = importlib.util.spec_from_file_location(f"rewards_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise AppError(f"{path} line {e.lineno}: not valid Python ({e.msg})") from None
    except Exception as e:  # the user's code: one sentence, not our traceback
        raise AppError(f"{path}: running it failed with {type(e).__name__}: {e}") from None
    found = [f for name, f in vars(module).items()
             if inspect.isfunction(f) and f.__module__ == module.__name__ and not name.startswith("_")]
    if not found:
        raise AppError(f"{path} defines no reward function (a top-level def f(prompts, completions, **kwargs) that "
                       f"returns one float per completion)")
    return found
