"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing new in exports/."""
import os
import subprocess
import sys

import pytest
import yaml

from app import ROOT
from app.cli import main
from app.runs import EXPORTS

TINY = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())


def write_recipe(tmp_path, rows=None, **changes) -> str:
    """A copy of the tiny recipe with `section.key` changes; `rows` (a list of lines) becomes its data file."""
    recipe = {section: dict(values) for section, values in TINY.items()}
    if rows is not None:
        (tmp_path / "data.jsonl").write_text("".join(line + "\n" for line in rows))
        recipe["data"]["source"] = str(tmp_path / "data.jsonl")
    for key, value in changes.items():
        section, field = key.split("__")
        recipe[section][field] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


GOOD = '{"prompt": "Hi?", "chosen": "Hello! Nice to meet you.", "rejected": "Go away."}'
CASES = {
    "unknown recipe": (lambda t: ["dpo", "no-such-recipe"], "no recipe named 'no-such-recipe'; recipes: "),
    "missing data file": (lambda t: ["dpo", write_recipe(t, data__source=str(t / "missing.jsonl"))],
                          "missing.jsonl does not exist"),
    "empty dataset": (lambda t: ["dpo", write_recipe(t, rows=[])], "the dataset is empty"),
    "row without rejected": (lambda t: ["dpo", write_recipe(t, rows=[GOOD, GOOD, '{"prompt": "a", "chosen": "b"}'])],
                             "data.jsonl line 3: missing 'rejected'"),
    "broken JSON line": (lambda t: ["dpo", write_recipe(t, rows=[GOOD, '{"prompt": "a",'])],
                         "data.jsonl line 2: not valid JSON"),
    "non-positive beta": (lambda t: ["dpo", write_recipe(t, dpo__beta=0)], "dpo.beta must be a positive number"),
    "negative beta override": (lambda t: ["dpo", "tiny", "--set", "dpo.beta=-1"], "dpo.beta must be a positive"),
    "misspelt DPO key": (lambda t: ["dpo", write_recipe(t, dpo__betta=0.1)],
                         "unknown key 'dpo.betta'; did you mean 'dpo.beta'?"),
    "unknown GGUF type": (lambda t: ["dpo", "tiny", "--set", "export.gguf=[f16, q3_weird]"],
                          "export.gguf type 'q3_weird' is not one of"),
    "model not cached while offline": (lambda t: ["dpo", write_recipe(t, model__name="nobody/no-such-model")],
                                       "'nobody/no-such-model' is not in the local Hugging Face cache and the hub "
                                       "cannot be reached (no network)"),
    "no run to export": (lambda t: ["export", str(t)], "has no adapter/"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(case, tmp_path, capsys):
    argv, expected = CASES[case]
    before = sorted(EXPORTS.iterdir())
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err, err
    assert "\n" not in err and "Traceback" not in err
    assert sorted(EXPORTS.iterdir()) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_recipe_without_gpu_or_network_says_which_is_missing():
    """As a real process: `make dpo MODEL=llama3-8b` here, with no GPU and no network."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "app", "dpo", "llama3-8b"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "needs a CUDA GPU and none is visible" in lines[0] and "the hub cannot be reached" in lines[0]
