"""`python -m app eval`: lm-evaluation-harness on the trained and the base model, the same items for both.

The tasks are local (tests/lm_eval_tasks/: a multiple-choice and a generation task over a JSONL of six
questions); on tiny the scores mean nothing, so the tests check what was evaluated and where it is shown."""
import json
import os
import shutil

from app import ROOT
from app.cli import main
from app.runs import EXPORTS

TASKS = "tests/lm_eval_tasks/tiny_qa.yaml,tests/lm_eval_tasks/tiny_gen.yaml"


def test_eval_measures_base_and_trained_on_the_same_items_and_reports_them(tiny_run, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the repository, as lm-eval reads it
    run = EXPORTS / f"eval-{os.getpid()}"  # eval writes into the run: a copy keeps the shared run as it was
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    try:
        assert main(["eval", str(run), "--tasks", TASKS, "--limit", "4", "--gguf", "f16"]) == 0
        evals = json.loads((run / "eval.json").read_text())
        assert evals["tasks"] == ["tiny_qa", "tiny_gen"] and evals["limit"] == 4 and evals["base"] == "tiny"
        items = evals["items"]
        assert items["base"] == items["trained"] and {n["count"] for n in items["trained"].values()} == {4}
        assert items["gguf"] == {"tiny_gen": items["trained"]["tiny_gen"]}  # generation tasks only, same items
        for key in ("results", "base_results"):
            assert set(evals[key]) == {"tiny_qa", "tiny_gen"}
            assert 0 <= evals[key]["tiny_qa"]["acc"] <= 1 and "exact_match" in evals[key]["tiny_gen"], evals[key]
        assert set(evals["gguf_results"]) == {"tiny_gen"}

        report = (run / "report.md").read_text()
        base, trained = evals["base_results"]["tiny_qa"], evals["results"]["tiny_qa"]
        assert "## Standard benchmarks (lm-evaluation-harness)" in report
        assert (f"| tiny_qa | acc | {base['acc']:.4f} ± {base['acc_stderr']:.4f} | {trained['acc']:.4f} ± "
                f"{trained['acc_stderr']:.4f} | {trained['acc'] - base['acc']:+.4f} | - |") in report
        assert "the same items for every model" in report
        assert "| tiny_qa | acc |" in (run / "merged" / "README.md").read_text()  # the model card lists them
        assert main(["verify", str(run)]) == 0  # the manifest was written again, naming eval.json
        assert "eval.json" in json.loads((run / "manifest.json").read_text())["files"]
        capsys.readouterr()
        assert main(["runs", "--json"]) == 0
        row = next(r for r in json.loads(capsys.readouterr().out) if r["run"] == run.name)
        assert row["bench_tasks"] == 2 and row["bench_base"] is not None and row["bench_trained"] is not None
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_a_hub_task_without_network_or_cache_is_one_sentence(tiny_run, capsys):
    assert main(["eval", str(tiny_run)]) == 2  # the default tasks are lm-eval's own, whose data is on the hub
    err = capsys.readouterr().err
    assert err.startswith("error: task 'truthfulqa_mc2' needs the dataset truthfulqa/truthful_qa from the Hugging "
                          "Face hub") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tiny_run / "eval.json").exists()
