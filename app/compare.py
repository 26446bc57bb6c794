"""Base against aligned: the same prompts, greedy replies from the model before and after training.

The aligned model is the run's GGUF (the one chat uses unless --quant names another), through llama.cpp
with the file's chat template and the recipe's `export.system`, as chat does. The base goes through
llama.cpp too when export wrote its GGUF (`export.base: true`), else through transformers with the
recipe's tokenizer and chat template. The replies are printed as two columns and saved as the run's
compare.md.
"""
from pathlib import Path

from app import AppError
from app.data import read_prompts
from app.export import BASE_GGUF
from app.generate import CONTEXT, GGUFModel, Sampling, TransformersModel
from app.gguf import find_gguf
from app.runs import rewriting_finished_run, write_text


def compare_run(run: Path, prompts_file: Path | None = None, max_tokens: int = 128, quant: str | None = None,
                log=print) -> list[dict]:
    """{prompt, base, aligned} per prompt; writes compare.md and prints the table."""
    from app.recipe import run_recipe

    if not 0 < max_tokens < CONTEXT:
        raise AppError(f"--max-tokens {max_tokens} must be positive and below the context of {CONTEXT} tokens")
    recipe = run_recipe(run)
    prompts = read_prompts(Path(prompts_file)) if prompts_file else list(recipe.export.probes)
    system = recipe.export.system or None
    aligned = find_gguf(str(run), quant)
    log(f"compare: {len(prompts)} prompts, greedy, up to {max_tokens} tokens; aligned: {aligned.name}")
    aligned_replies = gguf_replies(aligned, prompts, system, max_tokens)
    if (run / BASE_GGUF).is_file():
        base_label = f"{BASE_GGUF} (llama.cpp)"
        base_replies = gguf_replies(run / BASE_GGUF, prompts, system, max_tokens)
    else:
        source, base_replies = transformers_replies(recipe, prompts, system, max_tokens)
        base_label = f"{source} (transformers)"
    rows = [{"prompt": p, "base": b, "aligned": a} for p, b, a in zip(prompts, base_replies, aligned_replies)]
    labels = {"base": base_label, "aligned": f"{aligned.parent.name}/{aligned.name} (llama.cpp)"}
    with rewriting_finished_run(run):  # compare.md is part of the run, as the report is
        write_text(run / "compare.md", format_markdown(run.name, rows, labels, system, max_tokens))
    print_columns(rows, labels)
    log(f"saved: {run / 'compare.md'}")
    return rows


def gguf_replies(gguf: Path, prompts, system: str | None, max_tokens: int) -> list[str]:
    """Greedy one-turn replies through llama.cpp's chat completion with the GGUF's own template."""
    model = GGUFModel(gguf, n_ctx=CONTEXT)
    try:
        return model.replies_to(prompts, Sampling(max_tokens=max_tokens), system)
    finally:
        model.close()


def transformers_replies(recipe, prompts, system: str | None, max_tokens: int) -> tuple[str, list[str]]:
    """(the base's source, its greedy replies) with the recipe's tokenizer and chat template."""
    from app.model import load_tokenizer, resolve_model_source

    source = resolve_model_source(recipe)  # imports Unsloth, which must come before transformers
    model = TransformersModel.load(source, load_tokenizer(recipe))
    return source, model.replies_to(prompts, Sampling(max_tokens=max_tokens), system)


def format_markdown(run_name: str, rows, labels: dict, system: str | None, max_tokens: int) -> str:
    lines = [f"# Base against aligned: {run_name}", "",
             f"Greedy replies, at most {max_tokens} tokens, to the same prompts. Base: `{labels['base']}`. "
             f"Aligned: `{labels['aligned']}`. System prompt: {quote(system) if system else 'none'}.", ""]
    for i, row in enumerate(rows, 1):
        lines += [f"## {i}. {' '.join(row['prompt'].split())}", ""]
        for side in ("base", "aligned"):
            lines += [f"**{side}**", "", blockquote(row[side]), ""]
    return "\n".join(lines)


def blockquote(text: str) -> str:
    """Markdown quote of a reply, line by line, so its own markup cannot break the page's sections."""
    if not text:
        return "> *(empty reply)*"
    return "\n".join(f"> {line}".rstrip() for line in text.splitlines())


def quote(text: str) -> str:
    return '"' + " ".join(text.split()) + '"'


def print_columns(rows, labels: dict):
    """One two-column table per prompt. Text objects, not strings: rich would read `[...]` in a reply as
    markup. Without a terminal rich wraps at 80 columns and writes no colour codes."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    for i, row in enumerate(rows, 1):
        table = Table(title=Text(f"{i}. {row['prompt']}", style="bold"), title_justify="left", expand=True)
        table.add_column(Text(f"base: {labels['base']}"), ratio=1)
        table.add_column(Text(f"aligned: {labels['aligned']}"), ratio=1)
        table.add_row(Text(row["base"]), Text(row["aligned"]))
        console.print(table)
