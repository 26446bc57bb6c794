"""The model card: README.md in a run's merged/ and gguf/ folders, for the hub and for whoever gets the files.

`read_run` gathers what a card says from the run folder (recipe.yaml, train.json, smoke.json, eval.json,
the chat template, the Modelfile); `card_text` is a pure function of that, so tests need no training.
The metadata is huggingface_hub's ModelCardData; `base_model` and `datasets` name hub ids only (the hub
links them), so tiny, local folders and local data files are described in the text instead.
"""
import re
from pathlib import Path

from app import ROOT
from app.generate import CONTEXT
from app.report import fmt_num, fmt_pct
from app.runs import read_json, write_text

HUB_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")


def write_model_card(run: Path) -> list[Path]:
    """README.md in merged/ and gguf/, where they exist (a reward run has neither); returns the paths."""
    cards = [run / kind / "README.md" for kind in ("merged", "gguf") if (run / kind).is_dir()]
    facts = read_run(run) if cards else {}
    for card in cards:
        write_text(card, card_text(card.parent.name, facts))
    return cards


def read_run(run: Path) -> dict:
    """What the cards say, as plain values read from the run folder."""
    from app.ollama import chat_family
    from app.recipe import run_recipe, trl_config_default

    recipe, train = run_recipe(run), read_json(run / "train.json")
    method = train.get("method") or recipe.stages[-1]
    hyper = dict(recipe.methods[method])
    for key in ("beta", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps"):
        try:  # a key the recipe left out trained at TRL's default
            hyper.setdefault(key, trl_config_default(method, key))
        except KeyError:  # sft and reward have no beta
            pass
    base, earlier = recipe.model.name, []
    while Path(ROOT, base).name == "merged" and Path(ROOT, base).parent.joinpath("recipe.yaml").is_file():
        # a later stage of a recipe starts from the previous stage's merged/: name the model it all began with
        earlier.insert(0, Path(ROOT, base).parent.name)
        base = run_recipe(Path(ROOT, base).parent).model.name
    tokenizer = read_json(run / "merged" / "tokenizer_config.json") or {}
    template = run / "merged" / "chat_template.jinja"  # where transformers saves it; older ones inside the config
    template = template.read_text() if template.is_file() else tokenizer.get("chat_template")
    modelfile = run / "gguf" / "Modelfile"
    chat_gguf = re.search(r"^FROM \./(.+)$", modelfile.read_text(), re.M) if modelfile.is_file() else None
    return {"run": run.name, "recipe": recipe, "train": train, "method": method, "hyperparameters": hyper,
            "base": base, "earlier_runs": earlier, "license": base_license(base),
            "smoke": read_json(run / "smoke.json"), "eval": read_json(run / "eval.json"),
            "chat_family": chat_family(template) if isinstance(template, str) else None,
            "ggufs": sorted(p.name for p in (run / "gguf").glob("*.gguf")), "chat_gguf": chat_gguf and chat_gguf[1]}


def card_text(kind: str, facts: dict) -> str:
    """README.md for merged/ (`kind` "merged") or gguf/ ("gguf"): the metadata header, then the text."""
    from huggingface_hub import ModelCard, ModelCardData

    from app.model import BUILT
    method, recipe, train, h = facts["method"], facts["recipe"], facts["train"], facts["hyperparameters"]
    base, source = facts["base"], recipe.data.source
    base_id, dataset_id = hub_id(base), hub_id(source)
    data = ModelCardData(
        base_model=base_id, datasets=[dataset_id] if dataset_id else None, license=facts["license"],
        library_name="transformers" if kind == "merged" else None,  # GGUF: the hub infers it from the files
        pipeline_tag="text-generation", tags=[method, "trl", "unsloth", *(["gguf"] if kind == "gguf" else [])],
        # the hub would guess "quantized" from GGUF files; both folders hold a fine-tune of the base
        base_model_relation="finetune" if base_id else None)
    base_text = (BUILT[base][1] if base in BUILT else
                 f"[{base}](https://huggingface.co/{base})" if base_id else f"a local model, `{base}`")
    base_text += f", then {', '.join(facts['earlier_runs'])} (earlier stages)" if facts["earlier_runs"] else ""
    counts = train.get("data") or {}
    data_text = (f"[{source}](https://huggingface.co/datasets/{source})" if dataset_id else f"`{source}` (a local "
                 "file)") + (f": {counts['train']} examples trained, {counts['eval']} held out" if counts else "")
    how = ("every weight trained (full fine-tuning), saved in 16 bits" if recipe.model.full_finetuning else
           f"LoRA r {recipe.lora.r}, alpha {recipe.lora.lora_alpha}, on a "
           f"{'4-bit (nf4)' if recipe.model.load_in_4bit else '16-bit'} base, then merged")
    settings = [*([f"beta {h['beta']}"] if "beta" in h else []), f"learning rate {h.get('learning_rate')}",
                f"batch {h.get('per_device_train_batch_size')} x {h.get('gradient_accumulation_steps')} accumulated"]
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {facts['run']}" + (" (GGUF)" if kind == "gguf" else ""), "",
             f"A {method.upper()} fine-tune made with TRL through Unsloth, in 16-bit weights"
             + (", converted to GGUF by llama.cpp and checked against the merged weights." if kind == "gguf"
                else " (safetensors, for transformers)."), "", "## Training", "",
             f"- base model: {base_text}", f"- data: {data_text}",
             f"- method: {method}, {train.get('steps')} steps; {how}",
             f"- hyperparameters: {', '.join(settings)}",
             f"- chat template: {facts['chat_family'] or 'a layout this app does not recognise'} family", "",
             *preference_lines(train.get("preference") or {}, method), *smoke_lines(facts["smoke"]),
             *eval_lines(facts["eval"]), *usage_lines(kind, facts)]
    return str(ModelCard("\n".join(lines) + "\n"))


def preference_lines(pref: dict, method: str) -> list[str]:
    from app.evaluate import preference_headline

    before, after = pref.get("base", {}), pref.get("trained", {})
    if not after.get("pairs"):
        return []
    return ["## Held-out preference pairs", "", preference_headline(before, after, method, pref.get("beta")) + ".", "",
            "Reward accuracy: the share of pairs where training moved the model towards the chosen reply (DPO's "
            "implicit reward, against the base). Log-prob accuracy: the share where the model gives the chosen "
            "reply a higher log-probability than the rejected one.", "",
            "| model | reward accuracy | log-prob accuracy | mean log-prob margin (nats) |", "|---|---|---|---|",
            f"| base (before) | - | {fmt_pct(before.get('accuracy'))} | {fmt_num(before.get('margin'))} |",
            f"| trained (after) | {fmt_pct(after.get('reward_accuracy'))} | {fmt_pct(after.get('accuracy'))} | "
            f"{fmt_num(after.get('margin'))} |", ""]


def smoke_lines(smoke: dict | None) -> list[str]:
    rows = [f"| {r['file']} | {r['bytes'] / 2**20:.1f} | {fmt_pct(r.get('top1_agreement'))} | "
            f"{fmt_pct(r.get('preference', {}).get('reward_accuracy'))} | "
            f"{'pass' if r['passed'] else 'FAIL: ' + r['reason']} |" for r in (smoke or {}).get("results", [])]
    return ["## llama.cpp check", "", "Each GGUF against the merged weights in llama.cpp: prompt tokens, logits, "
            "greedy replies, held-out pairs.", "", "| file | MiB | top-1 agreement | held-out reward accuracy | result |",
            "|---|---|---|---|---|", *rows, ""] if rows else []


def eval_lines(evals: dict | None) -> list[str]:
    """eval.json, where a benchmark wrote one: its {task: {metric: number}} results (lm-eval's shape)."""
    results = (evals or {}).get("results", evals or {})
    rows = [f"| {task} | {metric} | {value:.4g} |" for task, metrics in results.items() if isinstance(metrics, dict)
            for metric, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return ["## Benchmarks", "", "| task | metric | value |", "|---|---|---|", *rows, ""] if rows else []


def usage_lines(kind: str, facts: dict) -> list[str]:
    if kind == "merged":
        return ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")',
                'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")', "```", "",
                "GGUF files for llama.cpp and Ollama are in the `gguf/` folder; its README.md says how to run them."]
    gguf = facts["chat_gguf"] or (facts["ggufs"] or ["MODEL.gguf"])[0]
    return ["## Use", "", f"Files: {', '.join(facts['ggufs'])}; each holds its chat template.", "",
            "llama.cpp, a chat in the terminal:", "", "```sh", f"llama-cli -m {gguf} -cnv", "```", "",
            "llama-cpp-python:", "", "```python", "from llama_cpp import Llama",
            f'llm = Llama(model_path="{gguf}", n_ctx={CONTEXT})',
            'print(llm.create_chat_completion(messages=[{"role": "user", "content": "Hello!"}]))', "```", "",
            f"Ollama, from this folder (the Modelfile names {gguf}" + (" and holds the chat template):" if
                                                                         facts["chat_family"] else "):"), "",
            "```sh", "ollama create NAME -f Modelfile", "ollama run NAME", "```"]


def hub_id(name: str) -> str | None:
    """`name` when it reads as a hub id and is no file or folder here (tiny, a local path: None)."""
    from app.data import LOCAL_SUFFIXES
    from app.model import BUILT, is_path, local_folder
    local = name in BUILT or name.endswith(LOCAL_SUFFIXES) or is_path(name) or local_folder(name) is not None
    return name if HUB_ID.fullmatch(name) and not local else None


def base_license(base: str) -> str | None:
    """The base model's license from its own card, where the local Hugging Face cache holds it (no network)."""
    from app.model import local_model_folder
    folder = local_model_folder(base) if hub_id(base) else None
    if folder is None or not (folder / "README.md").is_file():
        return None
    from huggingface_hub import ModelCard
    license = ModelCard.load(folder / "README.md", ignore_metadata_errors=True).data.license
    return None if license == "other" else license  # "other" would need the base's license_name and _link too
