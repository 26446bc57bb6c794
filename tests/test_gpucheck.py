"""app/gpucheck.py without a GPU: one line and exit 2; its recipe and its failure sentence. The dry run (the
whole pipeline on the CPU, ~2-4 minutes) is not here: `bash bench/gpu/run.sh OUT --dry-run` runs it."""
import json
import os
import subprocess
import sys

import pytest

from app import ROOT
from app.gpucheck import STEPS, failure_sentence, last_error, write_recipe
from app.progress import Progress, read_events, stage_seconds


def test_without_a_gpu_one_error_line_and_exit_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even on a machine that has one
    proc = subprocess.run([sys.executable, "-m", "app", "gpu-check"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no CUDA GPU is visible to torch (")
    assert "gpu-check needs one" in lines[0] and "make dpo" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_failure_sentence_names_the_stage_and_the_last_error_line(tmp_path):
    """The stage comes from the pipeline's progress events (app/progress.py), as a real run writes them."""
    progress = Progress(str(tmp_path / "progress.jsonl"))
    with progress.stage("preflight"):
        assert set(progress.so_far()) == {"preflight"}  # timings.json written inside a stage counts it
    with pytest.raises(RuntimeError), progress.stage("training"):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    events = read_events(tmp_path / "progress.jsonl")
    assert [(e["stage"], e["event"]) for e in events] == [("preflight", "start"), ("preflight", "end"),
                                                          ("training", "start"), ("training", "failed")]
    assert set(stage_seconds(events)) == {"preflight", "training"}
    lines = ["ok: versions: all 106 pins in requirements.txt are installed", "run folder: /x",
             "step    1/10 | loss 0.6931", "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "RuntimeError: CUDA error: no kernel image is available for execution on the device"]
    assert failure_sentence(events, lines) == ("the training stage failed (CUDA): RuntimeError: CUDA error: no kernel "
                                               "image is available for execution on the device")
    app_error = ["ok: versions: ...", "error: torch 2.11.0 is installed but requirements.txt pins torch==2.13.0; "
                 "fix: `make setup`", ""]
    assert failure_sentence(events[:1], app_error).startswith("the preflight stage failed (versions): torch 2.11.0 is")
    assert failure_sentence([], app_error).startswith("the startup stage failed")
    assert last_error(["", "  something odd", ""]) == "something odd"


def test_its_recipe_loads_and_the_memory_planner_reads_it(tmp_path):
    from app.memory import estimate_training_memory
    from app.recipe import load_recipe
    from app.shapes import SHAPES

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SHAPES["gpu-check"]))
    recipe = load_recipe(str(write_recipe(tmp_path / "gpu-check.yaml", model, dry_run=False)))
    assert recipe.model.load_in_4bit is True and recipe.model.dtype is None
    assert recipe.methods["dpo"]["max_steps"] == STEPS == 10 and recipe.methods["dpo"]["max_length"] == 512
    assert recipe.methods["dpo"]["precompute_ref_log_probs"] is True  # the up-front pass a 20,000-pair recipe takes
    assert recipe.export.gguf == ["f16", "q4_k_m"]
    assert 1.0 < estimate_training_memory(recipe).total < 4.0  # GiB: 0.14B, mostly embeddings, + 1 GiB of context


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_path_passes_on_this_gpu():
    """On a GPU machine the suite runs the check itself: 4-bit load, LoRA, DPO, merge, GGUF, smoke."""
    from app.gpucheck import run_gpu_check
    report = run_gpu_check()
    assert report["result"] == "PASS", report["reason"]
