"""Recipes: one YAML file per model or method, validated before anything heavy is loaded.

A recipe has five sections (and an optional `name`, which defaults to the file's stem). `dpo:` keys are trl.DPOConfig's own field names (checked against TRL's
dataclass, so a field TRL adds works here unchanged); the other sections are ours and small:

    model:  name (hub id, local folder, or `tiny`), max_seq_length, load_in_4bit, dtype, chat_template,
            requires_gpu; params and gpu_memory_gb describe it for `recipes`
    lora:   r, lora_alpha, lora_dropout, target_modules, bias, use_rslora, random_state
    data:   source (hub id, local file or dataset folder), split, config, columns, eval_share or
            eval_split, eval_pairs (how many held-out pairs are scored by log-prob for base, trained
            and every GGUF), max_rows, seed
    dpo:    any trl.DPOConfig field (beta, learning_rate, max_length, max_steps, ...)
    export: gguf (list of types: f32, f16, bf16, q8_0, q4_k_m, ...), probes (prompts for the smoke test
            and the before/after replies), system (a system prompt for the Ollama Modelfile)
"""
import ast
import dataclasses
import difflib
import importlib.util
from pathlib import Path

import yaml

from app import ROOT, AppError

RECIPES = ROOT / "recipes"

OUR_KEYS = {
    "model": {"name", "params", "gpu_memory_gb", "max_seq_length", "load_in_4bit", "dtype", "chat_template",
              "requires_gpu"},
    "lora": {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "random_state"},
    "data": {"source", "split", "config", "columns", "eval_share", "eval_split", "eval_pairs", "max_rows",
             "seed"},
    "export": {"gguf", "probes", "system"},
}
SECTIONS = [*OUR_KEYS, "dpo"]
DEFAULTS = {
    "model": {"params": None, "gpu_memory_gb": None, "max_seq_length": 2048, "load_in_4bit": True, "dtype": None,
              "chat_template": None, "requires_gpu": False},
    "lora": {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", "random_state": 3407,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "data": {"split": "train", "config": None, "columns": None, "eval_share": 0.1, "eval_split": None,
             "eval_pairs": 200, "max_rows": None, "seed": 0},
    "dpo": {},
    "export": {"gguf": ["f16", "q8_0", "q4_k_m"],
               "probes": ["What is the sun?", "Tell me about bees.", "How do I make bread?"], "system": None},
}


@dataclasses.dataclass
class Recipe:
    name: str      # the file's stem: `tiny`, `llama3-8b`
    path: Path     # where it was read from
    model: dict
    lora: dict
    data: dict
    dpo: dict      # keyword arguments for trl.DPOConfig
    export: dict

    def to_dict(self) -> dict:
        return {s: getattr(self, s) for s in SECTIONS}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise AppError(f"recipe file {path} does not exist")
        return path
    path = RECIPES / f"{name_or_path}.yaml"
    if not path.is_file():
        raise AppError(f"no recipe named '{name_or_path}'; recipes: {', '.join(recipe_names())}")
    return path


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    """Read, override (`section.key=value`, value parsed as YAML), fill defaults and validate."""
    path = find_recipe(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise AppError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise AppError(f"{path}: a recipe is a mapping of sections ({', '.join(SECTIONS)})")
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise AppError(f"override '{item}' is not of the form section.key=value (e.g. dpo.beta=0.2)")
        raw.setdefault(section, {})[field] = yaml.safe_load(value) if value else None

    name = raw.pop("name", None) or path.stem  # a run's resolved recipe.yaml keeps its recipe's name
    _check_keys(path, raw, "", SECTIONS)
    sections = {}
    for section in SECTIONS:
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise AppError(f"{path}: section '{section}' must be a mapping of keys to values")
        valid = OUR_KEYS.get(section) or dpo_config_fields()
        _check_keys(path, given, section + ".", valid)
        sections[section] = {**DEFAULTS[section], **given}
    recipe = Recipe(name=str(name), path=path, **sections)
    _check_values(recipe)
    return recipe


def _check_keys(path, given: dict, prefix: str, valid):
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
            raise AppError(f"{path}: unknown key '{prefix}{key}'{hint}")


def _check_values(r: Recipe):
    where = f"{r.path}:"
    if not r.model.get("name"):
        raise AppError(f"{where} model.name is required (a hub id, a local folder, or 'tiny')")
    if not r.data.get("source"):
        raise AppError(f"{where} data.source is required (a hub dataset id or a local .jsonl/.json/.csv/.parquet)")
    beta = r.dpo.get("beta", 0.1)
    if not isinstance(beta, (int, float)) or beta <= 0:
        raise AppError(f"{where} dpo.beta must be a positive number, got {beta!r}")
    share = r.data["eval_share"]
    if not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise AppError(f"{where} data.eval_share must be a number in [0, 1), got {share!r}")
    if not isinstance(r.data["eval_pairs"], int) or r.data["eval_pairs"] < 0:
        raise AppError(f"{where} data.eval_pairs must be a whole number >= 0, got {r.data['eval_pairs']!r}")
    for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps"):
        value = r.dpo.get(key)
        if value is not None and (not isinstance(value, int) or (value <= 0 and key != "max_steps")):
            raise AppError(f"{where} dpo.{key} must be a positive integer, got {value!r}")
    from app.export import GGUF_TYPES  # one list of types, owned by the stage that makes them
    for t in r.export["gguf"]:
        if t not in GGUF_TYPES:
            raise AppError(f"{where} export.gguf type '{t}' is not one of {', '.join(GGUF_TYPES)}")


def dpo_config_fields() -> set[str]:
    """The field names of trl.DPOConfig, TrainingArguments' included, read from TRL's and transformers'
    installed source rather than imported: importing them costs ~10 s (torch), and validation should
    answer at once. tests/test_recipes.py checks that this equals dataclasses.fields(DPOConfig)."""
    trl_dir = Path(importlib.util.find_spec("trl").origin).parent
    transformers_dir = Path(importlib.util.find_spec("transformers").origin).parent
    classes = {}
    for source in (trl_dir / "trainer" / "dpo_config.py", trl_dir / "trainer" / "base_config.py",
                   transformers_dir / "training_args.py"):
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node
    fields, name = set(), "DPOConfig"
    while name in classes:  # DPOConfig -> _BaseConfig -> TrainingArguments
        cls = classes[name]
        fields |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                   and not n.target.id.startswith("_")}
        name = next((b.id for b in cls.bases if isinstance(b, ast.Name)), None)
    return fields


def save_recipe(recipe: Recipe, path: Path):
    """The resolved recipe (defaults and overrides applied), so a run folder says exactly what ran."""
    header = f"# resolved from {recipe.path.name}; rerun with: python -m app dpo {path}\n"
    path.write_text(header + yaml.safe_dump({"name": recipe.name, **recipe.to_dict()}, sort_keys=False))
