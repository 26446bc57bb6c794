"""Experiment trackers through TRL's report_to: a missing one is said before training; tensorboard logs."""
import importlib.util
import os
import re
import shutil

import pytest

from app.cli import main
from app.runs import EXPORTS


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_one_sentence_before_training(capsys):
    before = set(EXPORTS.iterdir())
    assert main(["dpo", "tiny", "--set", "dpo.report_to=wandb"]) == 2
    err = capsys.readouterr().err
    assert err == "error: dpo.report_to asks for wandb, which is not installed; fix: pip install wandb, or take it " \
                  "out of dpo.report_to\n"
    assert set(EXPORTS.iterdir()) == before  # stopped before the run folder was made


def test_trackers_are_checked_in_every_method_section_by_the_names_transformers_knows():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from app import AppError
    from app.preflight import TRACKERS, UNCHECKED_TRACKERS, check_trackers
    from app.recipe import load_recipe

    assert {*TRACKERS, *UNCHECKED_TRACKERS} == set(INTEGRATION_TO_CALLBACK)  # after an upgrade, says what is new
    assert check_trackers(load_recipe("tiny", ["sft.report_to=none"])).startswith("trackers: none")
    with pytest.raises(AppError, match=r"^kto.report_to: 'tensorbord' is not a tracker transformers knows"):
        check_trackers(load_recipe("tiny", ["kto.report_to=[tensorbord]"]))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="make setup EXTRAS=tensorboard")
def test_report_to_tensorboard_writes_the_runs_event_files(capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest = EXPORTS / "latest"
    old_latest = os.readlink(latest) if latest.is_symlink() else None
    code = main(["dpo", "tiny", "--set", "dpo.max_steps=2", "--set", "dpo.logging_steps=1", "--set", "dpo.eval_steps=2",
                 "--set", "dpo.report_to=tensorboard", "--set", "export.gguf=[f16]"])
    run = EXPORTS / re.search(r"^run folder: .*/(.+)$", capsys.readouterr().out, re.M)[1]
    try:
        assert code == 0
        (events,) = (run / "tensorboard").glob("events.out.tfevents.*")  # in the run, not in ./runs/
        logged = EventAccumulator(str(events)).Reload()
        assert [e.step for e in logged.Scalars("train/loss")] == [1, 2]
        assert "eval/loss" in logged.Tags()["scalars"]
    finally:
        shutil.rmtree(run, ignore_errors=True)
        latest.unlink(missing_ok=True)
        if old_latest:
            latest.symlink_to(old_latest)
