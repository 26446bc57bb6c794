"""A run killed after a checkpoint resumes in its own folder and ends where an uninterrupted run ends."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file  # the adapter is bfloat16, which numpy has no type for

from app import ROOT
from app.cli import main
from app.runs import EXPORTS
from tests.conftest import TINY_STEPS, read_jsonl


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_adapter(tiny_run, tmp_path):
    latest = os.readlink(EXPORTS / "latest")
    before = set(EXPORTS.glob("tiny-*"))
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "app", "dpo", "tiny", "--set", f"dpo.max_steps={TINY_STEPS}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    run, deadline = None, time.time() + 600
    try:
        while time.time() < deadline:  # SIGKILL as soon as the step-20 checkpoint is complete
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            run = next(iter(set(EXPORTS.glob("tiny-*")) - before), None)
            if run and (run / "checkpoints" / "checkpoint-20" / "trainer_state.json").is_file():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.1)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        assert not (run / "adapter").exists() and not (run / "manifest.json").exists()  # cut short indeed

        assert main(["dpo", "--resume", str(run)]) == 0
        resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        straight = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
        assert resumed.keys() == straight.keys()
        worst = max((resumed[k].float() - straight[k].float()).abs().max().item() for k in straight)
        assert worst <= 1e-6, f"resumed adapter differs from the uninterrupted one by {worst}"
        logs = read_jsonl(run / "metrics.jsonl")
        train_steps = [r["step"] for r in logs if "loss" in r]
        assert train_steps == list(range(5, TINY_STEPS + 1, 5))  # each logged step once
        assert [r["step"] for r in logs if "eval_loss" in r] == list(range(0, TINY_STEPS + 1, 20))
        assert main(["verify", str(run)]) == 0
    finally:
        proc.kill()
        log.close()
        if run:
            shutil.rmtree(run, ignore_errors=True)
        (EXPORTS / "latest").unlink(missing_ok=True)
        (EXPORTS / "latest").symlink_to(latest)


def test_resume_refuses_a_finished_run(tiny_run, capsys):
    assert main(["dpo", "--resume", str(tiny_run)]) == 2
    assert "finished training" in capsys.readouterr().err
