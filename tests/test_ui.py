"""The web app's rules without a browser or a model (fast tier): the token, the origin check, paths confined to
the project, and labels written so that app/data.py reads the pairs and nothing else."""
import json
import shutil

import pytest

from app import ROOT
from app.runs import EXPORTS

TOKEN = "test-token-123"
PROMPTS = ["What is the sun?", "Tell me about bees.", "Can you explain rain?"]


@pytest.fixture
def client():
    from fastapi.testclient import TestClient

    from app.ui import create_app
    return TestClient(create_app(TOKEN))


@pytest.fixture
def folder():
    """A folder inside exports/ (where labels may be written) with a prompts file and a file that starts like a
    GGUF (the label endpoints check the model's file, and never load it when no replies are asked for)."""
    path = EXPORTS / f"ui-test-{id(object())}"
    path.mkdir(parents=True)
    (path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (path / "model.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    yield path
    shutil.rmtree(path)


def rel(path) -> str:
    return str(path.relative_to(ROOT))


def test_every_request_needs_the_token(client):
    assert client.get("/api/choices").status_code == 403
    assert client.get("/api/choices", headers={"X-Token": "wrong"}).status_code == 403
    first = client.get("/label?token=" + TOKEN)  # the printed address: the page, and the cookie it reads
    assert first.status_code == 200 and client.cookies.get("prefalign_ui_token") == TOKEN
    assert client.get("/api/choices").status_code == 200  # the cookie alone lets a page read


def test_a_change_needs_the_token_header_and_the_same_origin(client):
    assert client.post("/api/train/stop").status_code == 403
    client.get("/label?token=" + TOKEN)
    assert client.post("/api/train/stop").status_code == 403, "the cookie alone must not allow a change (CSRF)"
    header = {"X-Token": TOKEN}
    assert client.post("/api/train/stop", headers={**header, "Origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/train/stop", headers={**header, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    same = client.post("/api/train/stop", headers={**header, "Origin": "http://testserver",
                                                   "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200 and same.json() == {"stopping": True}


@pytest.mark.parametrize("path", ["/etc/passwd", "../../etc/passwd", "exports/../README.md", "app/ui.py",
                                  "recipes/../../etc/hosts"])
def test_paths_outside_the_project_folders_are_refused(client, path):
    answer = client.get("/api/label/state", params={"prompts": path, "labels": "exports/labels/x.jsonl"},
                        headers={"X-Token": TOKEN})
    assert answer.status_code == 400
    assert "outside the project" in answer.json()["error"] or "without '..'" in answer.json()["error"]


def test_training_runs_the_cli_with_checked_arguments():
    from app import AppError
    from app.ui import training_argv

    argv = training_argv("dpo", "tiny", "recipes/data/tiny_prefs.jsonl", 8, 0.2, 1e-3, True)
    assert argv == ["dpo", "tiny", "--set", "data.source=recipes/data/tiny_prefs.jsonl", "--set", "dpo.max_steps=8",
                    "--set", "dpo.beta=0.2", "--set", "dpo.learning_rate=0.001", "--set", "export.base=true"]
    with pytest.raises(AppError, match="outside the project"):
        training_argv("dpo", "tiny", "/etc/passwd.jsonl", None, None, None, False)
    with pytest.raises(AppError, match="no method"):
        training_argv("ppo", "tiny", None, None, None, None, False)
    with pytest.raises(AppError, match="no recipe"):
        training_argv("dpo", "../tiny", None, None, None, None, False)


def test_labels_are_pairs_that_app_data_reads_and_ties_and_skips_stay_out(client, folder):
    from app.data import load_preference_data
    from app.recipe import DataSection

    labels = folder / "labels.jsonl"
    common = {"model": rel(folder / "model.gguf"), "prompts": rel(folder / "prompts.txt"), "labels": rel(labels),
              "a": "Good question! The sun is a star.", "b": "Go away."}
    headers = {"X-Token": TOKEN}
    state = client.get("/api/label/state", params={"prompts": common["prompts"], "labels": common["labels"]},
                       headers=headers).json()
    assert (state["index"], state["pairs"], state["total"]) == (0, 0, 3)

    def choose(index, choice, **extra):
        return client.post("/api/label/choose", json={**common, "index": index, "choice": choice, **extra},
                           headers=headers)

    assert choose(0, "a", chosen_text="Good question! The sun is a star. It gives us light.").status_code == 200
    assert choose(0, "b").status_code == 400, "a prompt is labeled once"
    state = choose(1, "tie").json()
    assert (state["index"], state["pairs"], state["ties"]) == (2, 1, 1)
    same = choose(2, "a", chosen_text="Go away.")  # edited into the other reply: nothing to prefer
    assert same.status_code == 400 and "tie" in same.json()["error"]
    state = choose(2, "skip").json()
    assert (state["index"], state["pairs"], state["ties"], state["skips"], state["prompt"]) == (3, 1, 1, 1, None)

    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["chosen"].endswith("It gives us light.") and rows[0]["rejected"] == "Go away."
    assert rows[0]["provenance"]["edited"] is True and rows[0]["provenance"]["sampling"]["seeds"] == [0, 1]
    assert rows[0]["provenance"]["model"] == common["model"]
    data = load_preference_data(DataSection(source=str(labels), eval_share=0))
    assert data.rows == 1 and len(data.train) == 1 and data.dropped == {}
    assert data.train[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]}]
    undecided = [json.loads(line) for line in (folder / "labels.undecided.jsonl").read_text().splitlines()]
    assert [r["choice"] for r in undecided] == ["tie", "skip"]


def test_reopening_resumes_at_the_first_unlabeled_prompt(folder):
    from app.ui import append_line, label_progress, label_row, undecided_file

    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    labels = folder / "labels.jsonl"
    append_line(undecided_file(labels), label_row(prompts[0], "skip", "x", "y", None, {}))
    append_line(labels, label_row(prompts[2], "b", "x", "y", None, {}))
    state = label_progress(prompts, labels)  # the middle one is the first left
    assert (state["index"], state["prompt"], state["pairs"], state["skips"]) == (1, prompts[1], 1, 1)


def test_beyond_loopback_the_app_needs_a_key(capsys):
    from app.cli import main

    assert main(["ui", "--host", "0.0.0.0", "--api-key", ""]) == 2
    assert "no API key" in capsys.readouterr().err


def test_the_chart_reads_the_training_lines_of_metrics(folder):
    from app.ui import chart_points

    (folder / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "eval_loss": 0.69}) + "\n" +
        json.dumps({"step": 5, "loss": 0.6, "rewards/accuracies": 0.75, "rewards/margins": 0.1}) + "\n" +
        json.dumps({"step": 10, "loss": 0.5, "mean_token_accuracy": 0.9}) + "\n")
    assert chart_points(folder) == [{"step": 5, "loss": 0.6, "accuracy": 0.75, "margin": 0.1},
                                    {"step": 10, "loss": 0.5, "accuracy": 0.9, "margin": None}]


@pytest.mark.slow
def test_stop_interrupts_a_training_as_ctrl_c_does(client):
    """Start trains through the CLI in a process of its own; a second start waits for it; Stop is Ctrl-C, and
    stops it even when the app was started with Ctrl-C ignored, as a script's background job is (which the
    training inherits; it once trained on to the end under CI's shell)."""
    import signal
    import time

    headers = {"X-Token": TOKEN}
    form = {"recipe": "tiny", "method": "dpo", "max_steps": 1000, "export_base": False}
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        started = client.post("/api/train/start", json=form, headers=headers).json()
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert started["command"] == "python -m app dpo tiny --set dpo.max_steps=1000"
    assert "already running" in client.post("/api/train/start", json=form, headers=headers).json()["error"]
    deadline, job = time.time() + 400, {}  # a clean checkout may build the tiny model first (~3 min)
    while not (job := client.get("/api/train/status", headers=headers).json()["job"])["run"]:  # training began
        assert job["running"] and time.time() < deadline, job
        time.sleep(0.5)
    run = EXPORTS / job["run"]
    try:
        assert client.post("/api/train/stop", headers=headers).status_code == 200
        while (job := client.get("/api/train/status", headers=headers).json()["job"])["running"]:
            assert time.time() < deadline, job
            time.sleep(0.5)
        lines = client.get("/api/train/status", headers=headers).json()["job"]["lines"]
        assert job["returncode"] == 130 and lines[-1] == "interrupted", lines[-5:]
    finally:
        shutil.rmtree(run, ignore_errors=True)
