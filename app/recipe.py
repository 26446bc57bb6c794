"""Recipes: one YAML file per model or method, validated before anything heavy is loaded.

A recipe has seven sections of ours, `model`, `lora`, `data`, `rewards`, `export`, `eval` and `launch`, whose
keys, defaults, types and help live in the dataclasses below (one place: validation, defaults and `--help`-style
docs all read them; the code reads them as attributes, `recipe.model.name`);
one section per training method whose keys are that TRL config's own field names (checked against TRL's
dataclass, parsed from its source, so a field TRL adds works here unchanged); and three optional top-level
keys: `name` (defaults to the file's stem), `stages` (the methods a recipe runs, in order, each starting
from the previous one's merged weights; default [dpo]) and `base` (another recipe whose sections this one
starts from, key by key, so a method recipe says only what differs).
"""
import ast
import dataclasses
import difflib
import functools
import importlib.util
import logging
import re
import typing
from pathlib import Path

import yaml

from app import ROOT, AppError, repo_path
from app.methods import METHODS, NOT_OFFERED, ONLINE

RECIPES = ROOT / "recipes"
logger = logging.getLogger(__name__)

def key(default, help: str, positive: bool = False):
    """A recipe key: its default and help; `positive` numbers must be > 0."""
    factory = (lambda: list(default)) if isinstance(default, list) else None
    return (dataclasses.field(default_factory=factory, metadata={"help": help, "positive": positive}) if factory
            else dataclasses.field(default=default, metadata={"help": help, "positive": positive}))


@dataclasses.dataclass
class ModelSection:
    name: str | None = key(None, "a hub id (org/name), a local folder written by save_pretrained, or `tiny`")
    params: object = key(None, "the model's size, e.g. 8.0B, for `recipes` and the disk estimate")
    gpu_memory_gb: object = key(None, "not used: the memory planner estimates it (`make recipes`, `make preflight`); "
                                      "accepted so that the recipe.yaml of older runs still loads")
    max_seq_length: int = key(2048, "the longest sequence Unsloth prepares for", positive=True)
    load_in_4bit: bool = key(True, "train on an nf4 (bitsandbytes) copy of the base; export merges onto it, dequantized")
    full_finetuning: bool = key(False, "train every weight (Unsloth's full_finetuning) in 16 bits: no LoRA, no 4-bit; "
                                       "export saves the trained weights, with no merge")
    dtype: str | None = key(None, "compute dtype: auto, float32, float16 or bfloat16 (null: Unsloth picks)")
    chat_template: str | None = key(None, "an Unsloth template name, for a model without its own")
    requires_gpu: bool = key(False, "stop at once, in one sentence, where torch sees no CUDA GPU")
    trust_remote_code: bool = key(False, "run Python code from the model's repository (a warning says so)")
    allow_pickle: bool = key(False, "load pickle weights (*.bin), which can run code when loaded")
    auto_fit: bool = key(False, "preflight picks the largest batch that fits the GPU (app/memory.py)")


@dataclasses.dataclass
class LoraSection:
    r: int = key(16, "LoRA rank", positive=True)
    lora_alpha: float = key(16, "LoRA scaling numerator (scale = lora_alpha / r)", positive=True)
    lora_dropout: float = key(0.0, "dropout on the LoRA path")
    target_modules: list | str = key(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                     "the projections that get an adapter")
    bias: str = key("none", "PEFT's bias setting")
    use_rslora: bool = key(False, "rank-stabilised scaling (lora_alpha / sqrt(r))")
    random_state: int = key(3407, "seed of the adapter's initial weights")


@dataclasses.dataclass
class DataSection:
    source: str | None = key(None, "a hub dataset id, a dataset folder, or a .jsonl/.json/.csv/.parquet file")
    split: str = key("train", "the hub split to read")
    config: object = key(None, "the hub dataset's config name")
    columns: dict | None = key(None, "other column names: {prompt: question, chosen: good, rejected: bad}")
    eval_share: float = key(0.1, "the share held out for evaluation, in [0, 1)")
    eval_split: str | None = key(None, "a named split to hold out instead of eval_share")
    eval_pairs: int = key(200, "held-out pairs scored by log-prob for the base, the trained model and every GGUF")
    max_rows: int | None = key(None, "read at most this many rows", positive=True)
    seed: int = key(0, "the shuffle before the held-out split")
    unpair: bool = key(False, "kto: each pair becomes a good (true) and a bad (false) example")
    prompts: str | None = key(None, "grpo, rloo: the prompts they sample replies to, a text file (one a line) or any "
                                    "file or dataset with a prompt column; null: the training prompts of source")


@dataclasses.dataclass
class RewardsSection:
    run: str | None = key(None, "grpo, rloo: a reward run (exports/<run>) whose model scores every sampled reply; "
                                "null in a recipe whose stages have a reward stage: that stage's run")
    functions: str | None = key(None, "grpo, rloo: a Python file whose top-level functions score the replies too "
                                      "(TRL's reward functions: f(prompts, completions, **columns) -> list of floats); "
                                      "its code runs, and a warning says so")


@dataclasses.dataclass
class ExportSection:
    gguf: list = key(["f16", "q8_0", "q4_k_m"], "GGUF types to write (app/gguf.py GGUF_TYPES)")
    probes: list = key(["What is the sun?", "Tell me about bees.", "How do I make bread?"],
                       "prompts for the smoke test and the before/after replies")
    system: str | None = key(None, "a system prompt for the Ollama Modelfile and chat")
    base: bool = key(False, "also convert the untrained base to GGUF, for `compare`")


@dataclasses.dataclass
class EvalSection:
    # general ability (arc_easy, hellaswag) and a safety-oriented task (truthfulqa_mc2); minutes each in
    # app/benchmarks.py TASK_COST
    tasks: list = key(["truthfulqa_mc2", "arc_easy", "hellaswag"],
                      "lm-eval tasks for `python -m app eval`: lm-eval names or task YAML files")
    limit: int | None = key(1000, "the first N items of each task (null: every item)", positive=True)


@dataclasses.dataclass
class LaunchSection:
    config: str | None = key(None, "--processes N > 1: an accelerate config file (FSDP2, DeepSpeed ZeRO) for "
                                   "`accelerate launch`; null: data-parallel DDP")


OURS = {"model": ModelSection, "lora": LoraSection, "data": DataSection, "rewards": RewardsSection,
        "export": ExportSection, "eval": EvalSection, "launch": LaunchSection}
DTYPES = (None, "auto", "float32", "float16", "bfloat16")


SECTIONS = [*OURS, *METHODS]


@dataclasses.dataclass
class Recipe:
    name: str                # the file's stem: `tiny`, `llama3-8b`
    path: Path               # where it was read from
    model: ModelSection
    lora: LoraSection
    data: DataSection
    rewards: RewardsSection  # where grpo and rloo get their reward
    export: ExportSection
    eval: EvalSection        # lm-eval tasks for `python -m app eval`
    launch: LaunchSection    # how --processes N launches the training (accelerate)
    stages: list             # methods, run in order: [dpo], [sft, dpo], ...
    methods: dict            # method -> keyword arguments for its TRL config: methods["dpo"] for trl.DPOConfig, ...

    def to_dict(self) -> dict:
        return {"stages": self.stages, **{s: dataclasses.asdict(getattr(self, s)) for s in OURS}, **self.methods}

    def with_method(self, method: str, changes: dict) -> "Recipe":
        """A new recipe whose `method` section has `changes` applied."""
        return dataclasses.replace(self, methods={**self.methods, method: {**self.methods[method], **changes}})


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
    raw = read_recipe_file(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise AppError(f"override '{item}' is not of the form section.key=value (e.g. dpo.beta=0.2)")
        if not isinstance(raw.setdefault(section, {}), dict):
            raise AppError(f"{path}: section '{section}' must be a mapping of keys to values")
        try:
            raw[section][field] = yaml.safe_load(value) if value else None
        except yaml.YAMLError as e:
            raise AppError(f"override '{item}': the value is not valid YAML ({getattr(e, 'problem', e)})") from None

    name = str(raw.pop("name", None) or path.stem)  # a run's resolved recipe.yaml keeps its recipe's name
    if not name.strip() or any(c in name for c in '/\\\0\n') or ".." in name \
            or name.startswith((".", "-", "~")):  # the run folder is exports/<name>-<method>-<time>
        raise AppError(f"{path}: name {name!r} must be a plain name (letters, digits, '-', '_', '.'), not a path: "
                       f"run folders are made inside exports/")
    stages = raw.pop("stages", None) or ["dpo"]
    asked = [s for s in (stages if isinstance(stages, list) else []) + list(raw) if s in NOT_OFFERED]
    if asked:  # a `ppo:` section or stage: why not, rather than "unknown"
        raise AppError(f"{path}: {asked[0]}: {NOT_OFFERED[asked[0]]}")
    if not isinstance(stages, list) or not stages or any(s not in METHODS for s in stages):
        raise AppError(f"{path}: stages must be a list of methods from {', '.join(METHODS)}, got {stages!r}")
    _check_keys(path, raw, "", SECTIONS)
    sections = {}
    for section in SECTIONS:
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise AppError(f"{path}: section '{section}' must be a mapping of keys to values")
        valid = {f.name for f in dataclasses.fields(OURS[section])} if section in OURS else trl_config_fields(section)
        _check_keys(path, given, section + ".", valid)
        sections[section] = OURS[section](**given) if section in OURS else dict(given)
    recipe = Recipe(name=str(name), path=path, stages=stages, **{s: sections[s] for s in OURS},
                    methods={m: sections[m] for m in METHODS})
    _check_values(recipe)
    if recipe.model.full_finetuning:
        if "reward" in recipe.stages:
            raise AppError(f"{path}: model.full_finetuning is for the methods that train a chat model (sft, dpo, orpo, "
                           f"kto); a reward model trains LoRA and its score head: run it in a recipe of its own")
        unused = (["its lora section"] if raw.get("lora") else []) + (
            ["model.load_in_4bit"] if recipe.model.load_in_4bit else [])
        if unused:  # tiny.yaml has both: a warning, so `--set model.full_finetuning=true` works on any recipe
            logger.warning(f"recipe '{recipe.name}' sets model.full_finetuning: every weight trains in 16 bits, so "
                           f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used")
        recipe.model.load_in_4bit = False  # what runs, as the run's recipe.yaml and the planner read it
    return recipe


def read_recipe_file(path: Path, depth: int = 0) -> dict:
    """The YAML mapping, with its `base:` recipe's sections underneath it, key by key."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        if isinstance(e, yaml.constructor.ConstructorError):  # !!python/object and kin: safe_load refuses them
            tag = re.search(r"tag '([^']*)'", str(e.problem))
            tag = tag[1].replace("tag:yaml.org,2002:", "!!") if tag else "?"
            raise AppError(f"{path}{where}: the YAML tag '{tag}' is not allowed: a recipe holds plain values "
                           f"(numbers, text, lists, mappings) and never runs code") from None
        raise AppError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise AppError(f"{path}: a recipe is a mapping of sections ({', '.join(SECTIONS)})")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if depth >= 3:
        raise AppError(f"{path}: base recipes nest deeper than 3 (is there a cycle?)")
    under = read_recipe_file(find_recipe(str(base)), depth + 1)
    under.pop("name", None)  # the name is the file's own
    for key, value in raw.items():
        under[key] = {**under[key], **value} if isinstance(under.get(key), dict) and isinstance(value, dict) else value
    return under


def _check_keys(path, given: dict, prefix: str, valid):
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
            raise AppError(f"{path}: unknown key '{prefix}{key}'{hint}")


def _check_values(r: Recipe):
    where = f"{r.path}:"
    if not r.model.name:
        raise AppError(f"{where} model.name is required (a hub id, a local folder, or 'tiny')")
    if not r.data.source:
        raise AppError(f"{where} data.source is required (a hub dataset id or a local .jsonl/.json/.csv/.parquet)")
    _check_types(r)
    for method in ("dpo", "orpo", "kto"):
        beta = r.methods[method].get("beta", trl_config_default(method, "beta"))
        if not isinstance(beta, (int, float)) or beta <= 0:
            raise AppError(f"{where} {method}.beta must be a positive number, got {beta!r}")
    losses = r.methods["dpo"].get("loss_type", ["sigmoid"])
    known = dpo_loss_types()
    for loss in [losses] if isinstance(losses, str) else losses:
        if loss not in known:
            raise AppError(f"{where} dpo.loss_type '{loss}' is not one TRL's DPOTrainer knows: {', '.join(known)}")
    share = r.data.eval_share
    if not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise AppError(f"{where} data.eval_share must be a number in [0, 1), got {share!r}")
    if not isinstance(r.data.eval_pairs, int) or r.data.eval_pairs < 0:
        raise AppError(f"{where} data.eval_pairs must be a whole number >= 0, got {r.data.eval_pairs!r}")
    for method in METHODS:
        for key in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps"):
            value = r.methods[method].get(key)
            if value is not None and (not isinstance(value, int) or (value <= 0 and (key, value) != ("max_steps", -1))):
                raise AppError(f"{where} {method}.{key} must be a positive integer"
                               f"{' (or -1: train for num_train_epochs)' if key == 'max_steps' else ''}, got {value!r}")
    check_stages(r, r.stages)
    for key, path in (("rewards.functions", r.rewards.functions), ("launch.config", r.launch.config)):
        if path and not repo_path(path).is_file():
            raise AppError(f"{where} {key}: {path} does not exist")
    from app.gguf import GGUF_TYPES
    for t in r.export.gguf:
        if t not in GGUF_TYPES:
            raise AppError(f"{where} export.gguf type '{t}' is not one of {', '.join(GGUF_TYPES)}")


def check_stages(r: Recipe, stages: list):
    """What the stages a command runs need of the recipe: an online method needs a reward."""
    online = [s for s in stages if s in ONLINE]
    if online and not (r.rewards.run or r.rewards.functions or "reward" in stages[:stages.index(online[0])]):
        raise AppError(f"{r.path}: {online[0]} learns from a reward, and this recipe names none: set rewards.run (a "
                       f"reward run's folder), rewards.functions (a Python file of reward functions), or put a reward "
                       f"stage before it (stages: [sft, reward, {online[0]}])")


# values the app takes for a TRL field beyond its type: the reference cache's default (app/refcache.py)
APP_VALUES = {"dpo.precompute_ref_log_probs": ("auto",)}
TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text", list: "a list",
              dict: "a mapping", type(None): "null"}


def our_key_types(section: str) -> dict:
    """{key: tuple of Python types} from a section's annotations (`int | None` -> (int, NoneType)); keys
    annotated `object` take any value."""
    out = {}
    for f in dataclasses.fields(OURS[section]):
        if f.type is not object:
            out[f.name] = tuple(typing.get_origin(t) or t for t in (typing.get_args(f.type) or (f.type,)))
    return out


def _check_types(r: Recipe):
    """Wrong types are said here, not as a crash after the model has loaded: our keys from their annotations,
    and every TRL field whose annotation is plain (int, float, bool, str, None) from TRL's own source."""
    checks = [(f"{s}.{k}", getattr(getattr(r, s), k), kinds) for s in OURS for k, kinds in our_key_types(s).items()]
    for method in METHODS:
        annotations = trl_config_types(method)
        checks += [(f"{method}.{k}", v, annotations[k]) for k, v in r.methods[method].items()
                   if annotations.get(k) and v not in APP_VALUES.get(f"{method}.{k}", ())]
        for k, v in r.methods[method].items():  # YAML 1.1 reads no/yes/on/off as booleans
            if isinstance(v, bool) and k in trl_text_fields(method):
                raise AppError(f"{r.path}: {method}.{k} must be text, got {v!r} (YAML reads no, yes, on and off as "
                               f"false/true: quote it, e.g. {k}: \"no\")")
    positive = {f"{s}.{f.name}" for s in OURS for f in dataclasses.fields(OURS[s]) if f.metadata.get("positive")}
    for key, value, kinds in checks:
        ok = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool))
                 or (k is float and isinstance(value, int) and not isinstance(value, bool)) for k in kinds)
        if not ok:
            also = "".join(f" or {v!r}" for v in APP_VALUES.get(key, ()))
            hint = (" (YAML reads a number like 5e-4 as text: write 5.0e-4)" if isinstance(value, str)
                    and re.fullmatch(r"[-+]?[\d.]+e[-+]?\d+", value, re.I) else "")
            raise AppError(f"{r.path}: {key} must be {' or '.join(TYPE_NAMES[k] for k in kinds)}{also}, got {value!r}{hint}")
        if key in positive and value is not None and value <= 0:
            raise AppError(f"{r.path}: {key} must be positive, got {value!r}")
    if r.model.dtype not in DTYPES:
        raise AppError(f"{r.path}: model.dtype must be one of {', '.join(map(str, DTYPES[1:]))} (or null), "
                       f"got {r.model.dtype!r}")


def trl_config_types(method: str) -> dict:
    """{field: tuple of Python types} for the fields of a method's TRL config annotated with plain types
    only (`float`, `int | None`, `Optional[bool]`, ...); fields with other annotations are not listed."""
    plain = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
    types = {}
    for n in _config_fields(method):
        if n.target.id not in types:  # the subclass first: its annotation wins
            text = re.sub(r"^Optional\[(.*)\]$", r"\1 | None", ast.unparse(n.annotation))
            parts = [p.strip() for p in re.sub(r"^Union\[(.*)\]$", r"\1", text).replace(",", "|").split("|")]
            types[n.target.id] = tuple(plain[p] for p in parts) if all(p in plain for p in parts) else None
    return {k: v for k, v in types.items() if v}


def trl_config_default(method: str, key: str):
    """A field's default in a method's TRL config (subclass first), read from its source: the one place the
    app learns e.g. DPOConfig's beta or max_length when a recipe leaves them out."""
    for n in _config_fields(method):
        if n.target.id == key and n.value is not None:
            default = next((k.value for k in getattr(n.value, "keywords", []) if k.arg == "default"), n.value)
            return ast.literal_eval(default)
    raise KeyError(f"{METHODS[method].config} has no field {key}")


def trl_text_fields(method: str) -> set[str]:
    """Fields of a method's TRL config that take text (an enum's name, e.g. eval_strategy) and no boolean."""
    annotations = ((n.target.id, ast.unparse(n.annotation)) for n in _config_fields(method))
    return {name for name, text in annotations if re.search(r"\bstr\b", text) and not re.search(r"\bbool\b", text)}


def _config_fields(method: str):
    """The annotated fields (ast.AnnAssign nodes) of a method's TRL config class and then of its bases, in that
    order: DPOConfig -> _BaseConfig -> TrainingArguments."""
    classes, name = _trl_classes(method), METHODS[method].config
    while name in classes:
        yield from (n for n in classes[name].body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
        name = next((b.id for b in classes[name].bases if isinstance(b, ast.Name)), None)


@functools.cache
def _trl_classes(method: str) -> dict:
    """The class definitions of a method's TRL config and its bases, parsed from the installed source
    rather than imported: importing TRL costs ~10 s (torch), and validation should answer at once."""
    trl_dir = Path(importlib.util.find_spec("trl").origin).parent
    transformers_dir = Path(importlib.util.find_spec("transformers").origin).parent
    classes = {}
    for source in (trl_dir / METHODS[method].source, trl_dir / "trainer" / "base_config.py",
                   transformers_dir / "training_args.py"):
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node
    return classes


def trl_config_fields(method: str) -> set[str]:
    """The field names of a method's TRL config (e.g. DPOConfig), TrainingArguments' included.
    tests/test_recipes.py checks that this equals dataclasses.fields() of each imported class."""
    return {n.target.id for n in _config_fields(method) if not n.target.id.startswith("_")}


def dpo_loss_types() -> list[str]:
    """The loss types DPOConfig's own help text lists for `loss_type`, so a loss TRL adds works unchanged."""
    cls = _trl_classes("dpo")["DPOConfig"]
    field = next(n for n in cls.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "loss_type")
    help_text = "".join(c.value for c in ast.walk(field.value) if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return re.findall(r"`'([a-z_]+)'`", help_text.split("If multiple")[0])


def save_recipe(recipe: Recipe, path: Path):
    """The resolved recipe (defaults and overrides applied), so a run folder says exactly what ran (full
    fine-tuning uses no lora section, so none is written)."""
    header = f"# resolved from {recipe.path.name}; rerun with: python -m app train {path}\n"
    sections = {k: v for k, v in recipe.to_dict().items() if not (k == "lora" and recipe.model.full_finetuning)}
    path.write_text(header + yaml.safe_dump({"name": recipe.name, **sections}, sort_keys=False))


def run_recipe(run: Path) -> Recipe:
    """The recipe a run folder was trained with: its resolved recipe.yaml, read and checked like any recipe."""
    return load_recipe(str(run / "recipe.yaml"))
