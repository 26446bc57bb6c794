"""Shared fixtures: one real `dpo` run of the tiny recipe per test session (Unsloth imported once)."""
import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from app.runs import EXPORTS  # noqa: E402


# fixtures that train, build or export a model: a test that uses one is in the slow tier (make test-fast leaves
# it out)
TRAINING_FIXTURES = {"tiny_run", "tiny_run_copy", "reward_run", "new_runs", "smollm2_run", "tiny_model"}
SLOW_SELECTED = True  # whether this session runs any slow test (pytest_collection_finish says)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    global SLOW_SELECTED
    SLOW_SELECTED = any(item.get_closest_marker("slow") for item in session.items)


@pytest.fixture(scope="session", autouse=True)
def unsloth_first():
    """Unsloth before any test imports transformers, TRL or PEFT, as in the app (it patches them on import);
    at the first test, not at collection, so `pytest --collect-only` and -k selections start at once. Test
    modules import those libraries inside their tests only. A session of fast tests only (make test-fast)
    trains nothing and skips the import (~20 s)."""
    if SLOW_SELECTED:
        from app.model import import_unsloth
        import_unsloth()

TINY_STEPS = 60  # the recipe's own: the suite checks the run `make dpo` shows a newcomer


@pytest.fixture(scope="session")
def tiny_run(unsloth_first):
    """The run folder of `python -m app dpo tiny` (in-process), removed at the end of the session."""
    latest = EXPORTS / "latest"
    old_latest = os.readlink(latest) if latest.is_symlink() else None
    (run,) = run_in_process(["dpo", "tiny", "--set", f"dpo.max_steps={TINY_STEPS}"])
    # checked here, as later tests make runs of their own: a run whose GGUFs pass becomes exports/latest
    assert os.path.realpath(latest) == str(run.resolve()), "exports/latest did not move to the new run"
    yield run
    shutil.rmtree(run, ignore_errors=True)
    if old_latest:
        latest.unlink(missing_ok=True)
        latest.symlink_to(old_latest)
    elif latest.is_symlink():
        latest.unlink()


REWARD_STEPS = 20  # measured: 30 held-out pairs ranked >= 80% right at 20 steps


@pytest.fixture(scope="session")
def reward_run(unsloth_first):
    """The run folder of `python -m app reward tiny` at REWARD_STEPS (in-process), shared by the tests that
    score with a reward model (the reward method's own test, online RL, AI-feedback pairs); removed at the end."""
    (run,) = run_in_process(["reward", "tiny", "--set", f"reward.max_steps={REWARD_STEPS}"])
    yield run
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
def tiny_run_copy(tiny_run):
    """A copy of the session's tiny run inside exports/ (commands that write into a run only work there),
    for a test that deletes or rewrites its files: the shared run stays as it is, whatever the test order."""
    copy, latest = EXPORTS / f"{tiny_run.name}-copy-{os.getpid()}", EXPORTS / "latest"
    old_latest = os.readlink(latest) if latest.is_symlink() else None
    shutil.copytree(tiny_run, copy, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    yield copy
    shutil.rmtree(copy, ignore_errors=True)
    if old_latest:  # an export that passes moves exports/latest to the copy
        latest.unlink(missing_ok=True)
        latest.symlink_to(old_latest)


@pytest.fixture
def new_runs():
    """new_runs(prefix): the run folders this test made whose names start with `prefix` (sorted, i.e. by
    time); they are removed afterwards and `latest` restored. A prefix keeps other processes' runs out."""
    before, latest, asked = set(EXPORTS.iterdir()), EXPORTS / "latest", []
    old_latest = os.readlink(latest) if latest.is_symlink() else None

    def made(prefix):
        asked.append(prefix)
        return sorted(r for r in set(EXPORTS.glob(prefix + "*")) - before)

    yield made
    for prefix in asked:
        for run in set(EXPORTS.glob(prefix + "*")) - before:
            shutil.rmtree(run, ignore_errors=True)
    if old_latest:
        latest.unlink(missing_ok=True)
        latest.symlink_to(old_latest)


def run_in_process(argv: list[str]) -> list[Path]:
    """`python -m app ARGV` in this process (exit 0 asserted); the run folders it made, in order."""
    from app.cli import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        print(out.getvalue(), end="")
    assert code == 0
    return run_folders(out.getvalue())


def run_folders(out: str) -> list[Path]:
    """The runs a command made, from its "run folder:" lines (another process may be training too)."""
    return [Path(p) for p in re.findall(r"^run folder: (\S+)", out, re.M)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
