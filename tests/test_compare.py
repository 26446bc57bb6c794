"""compare on the tiny run: the base and the aligned model's greedy replies, side by side and in compare.md."""
import os
import shutil
from pathlib import Path

import pytest

from app.gguf import find_gguf
from app.cli import main
from app.compare import blockquote, compare_run
from app.export import BASE_GGUF, convert_base_model
from app.model import resolve_model_source
from app.recipe import load_recipe, run_recipe
from app.runs import EXPORTS
from app.smoke import check_ggufs


@pytest.fixture(scope="module")
def copy_run(tiny_run):
    """A function making a copy of what compare reads of the run (recipe.yaml, gguf/), as a run folder of this
    module's own in exports/ (compare writes into the run, which the CLI allows only there); removed at the end.
    Without train.json the copies are not trained runs to `runs`."""
    made = []

    def copy() -> Path:
        run = EXPORTS / f"compare-test-{os.getpid()}-{len(made)}"
        made.append(run)
        (run / "gguf").mkdir(parents=True)
        shutil.copy2(tiny_run / "recipe.yaml", run)
        for gguf in (tiny_run / "gguf").glob("*.gguf"):
            shutil.copy2(gguf, run / "gguf")
        return run

    yield copy
    for run in made:
        shutil.rmtree(run, ignore_errors=True)


def sections(run: Path) -> list[str]:
    return (run / "compare.md").read_text().split("\n## ")[1:]


@pytest.fixture(scope="module")
def compared(copy_run):
    """A copy of the run after compare on the recipe's probes (no base GGUF: the base through transformers)."""
    run = copy_run()
    return run, compare_run(run)


def test_compare_writes_both_replies_for_every_probe_and_alignment_shows(compared):
    run, rows = compared
    probes = run_recipe(run).export.probes
    assert [row["prompt"] for row in rows] == probes
    assert all(row["base"] and row["aligned"] for row in rows), rows
    assert len(sections(run)) == len(probes)
    for i, (section, row) in enumerate(zip(sections(run), rows), 1):
        assert section.startswith(f"{i}. {row['prompt']}\n")
        assert f"**base**\n\n{blockquote(row['base'])}\n" in section
        assert f"**aligned**\n\n{blockquote(row['aligned'])}\n" in section
    assert any(row["base"] != row["aligned"] for row in rows), rows  # DPO changed the tiny model's style
    header = (run / "compare.md").read_text().split("\n## ")[0]
    assert "(transformers)" in header
    assert f"Aligned: `gguf/{find_gguf(str(run)).name} (llama.cpp)`" in header  # the GGUF chat picks


def test_prompts_file_gives_one_section_per_line(copy_run, tmp_path, capsys):
    run = copy_run()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why is the sky blue?\n\nWhat is a cat?\n")
    assert main(["compare", str(run), "--prompts", str(prompts), "--max-tokens", "24", "--quant", "f16"]) == 0
    assert [s.splitlines()[0] for s in sections(run)] == ["1. Why is the sky blue?", "2. What is a cat?"]
    out = capsys.readouterr().out
    assert "1. Why is the sky blue?" in out and find_gguf(str(run), "f16").name in out  # the two-column table


def test_a_missing_prompts_file_is_one_sentence_and_exit_status_2(copy_run, tmp_path, capsys):
    run = copy_run()
    missing = tmp_path / "prompts.txt"
    assert main(["compare", str(run), "--prompts", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: prompts file {missing} does not exist (one prompt per line)\n"
    assert not (run / "compare.md").exists()


def test_compare_uses_the_base_gguf_that_export_base_writes(tiny_run, compared, copy_run):
    assert load_recipe("tiny").export.base is False
    recipe = load_recipe(str(tiny_run / "recipe.yaml"), ["export.base=true"])
    assert recipe.export.base is True
    run = copy_run()
    source = resolve_model_source(recipe)
    quiet = lambda line: None  # noqa: E731
    gguf = convert_base_model(source, tiny_run / "merged", run / BASE_GGUF.parent, log=quiet)
    assert gguf == run / BASE_GGUF
    # the smoke test's checks, against the base model itself: the file is the base, chat template included
    (checked,) = check_ggufs(Path(source), [gguf], recipe.export.probes, log=quiet)
    assert checked["passed"], checked["reason"]

    rows = compare_run(run, log=quiet)
    assert f"Base: `{BASE_GGUF} (llama.cpp)`" in (run / "compare.md").read_text()
    # the base's f16 GGUF answers as the base through transformers (smoke proves f16 greedy equal to float32)
    assert rows == compared[1]
