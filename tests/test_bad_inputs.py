"""Bad input, from the corpus in tests/bad_inputs/: every case goes through the real CLI and ends with exit
code 2, exactly one line on stderr that names the problem (and the file and line where it applies), no
traceback, and nothing new under exports/.

Most cases call app.cli.main in-process (capsys); the cases in SUBPROCESS run `python -m app` as a real
process, to prove that no traceback reaches stderr there either. The corpus is real files: recipes, data
files, model folders and GGUFs. Model folders hold tiny placeholder weights because every model check
fails before anything is loaded; the 10 MB row and the run folders are built on the fly. Disk full is
simulated with RLIMIT_FSIZE in a real export process.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app import ROOT, AppError
from app.cli import main
from app.recipe import RECIPES
from app.runs import EXPORTS

BAD = Path("tests/bad_inputs")  # relative to the repository, as a user would type it
BASE = str(BAD / "base.yaml")   # a valid recipe that the data and model cases change with --set
PWNED = Path("/tmp/prefalign-bad-inputs-pwned")  # what recipes/python_tag.yaml would create if it ran
F16 = 5_801_824  # the size a run's manifest records for its tiny-f16.gguf in the smoke and verify cases
SUBPROCESS = {"recipe: YAML syntax error", "recipe: !!python/object tag", "data: UTF-16", "chat: truncated GGUF"}


def recipe(name):
    return ["dpo", str(BAD / "recipes" / f"{name}.yaml")]


def data(name):
    return ["dpo", BASE, "--set", f"data.source={BAD / 'data' / name}"]


def model(name):
    return ["dpo", BASE, "--set", f"model.name={BAD / 'models' / name}"]


def gguf(name):
    return str(BAD / "gguf" / name)


PAIRS_OUT = "/tmp/prefalign-bad-inputs-pairs.jsonl"  # never written: every pairs case fails first


def pairs(mode, *flags):
    return ["pairs", "--mode", mode, "--prompts", "recipes/data/tiny_prefs.jsonl", "--out", PAIRS_OUT, *flags]


def constitution(name):
    return str(BAD / "constitutions" / f"{name}.yaml")


def huge_row(t):
    """One pair of 10 MB: dropped (no model reads it whole), which leaves no rows."""
    path = t.tmp / "huge.jsonl"
    path.write_text(json.dumps({"prompt": "Tell me everything. " * 500_000, "chosen": "Here.", "rejected": "No."}))
    return ["dpo", BASE, "--set", f"data.source={path}"]


def run_with_gguf(command, bad):
    """A run folder whose tiny-f16.gguf is `bad` while its manifest records the exported size. smoke writes
    into a run, so its folder is made in exports/ (and removed); verify only reads, so tmp_path does."""
    def build(t):
        files = {"recipe.yaml": (ROOT / BASE).read_text(), "gguf/tiny-f16.gguf": (ROOT / gguf(bad)).read_bytes(),
                 "manifest.json": json.dumps({"run": "bad", "files": {"gguf/tiny-f16.gguf": {"bytes": F16,
                                                                                          "sha256": "0" * 64}}})}
        return [command, str(t.run(f"{command}-{bad}", files) if command == "smoke" else t.folder(files))]
    return build


# case: (argv, or a function of the test's scratch space returning it; what the one line must say)
CASES = {
    # recipes
    "recipe: YAML syntax error": (recipe("yaml_syntax"), "yaml_syntax.yaml line 7: not valid YAML"),
    "recipe: unknown key": (recipe("unknown_key"), "unknown key 'lora.lora_alfa'; did you mean 'lora.lora_alpha'?"),
    "recipe: misspelt DPO key": (recipe("unknown_dpo_key"), "unknown key 'dpo.betta'; did you mean 'dpo.beta'?"),
    "recipe: wrong type": (recipe("wrong_type"), "wrong_type.yaml: lora.r must be a whole number, got 'sixteen'"),
    "recipe: reference cache setting": (["dpo", BASE, "--set", "dpo.precompute_ref_log_probs=sometimes"],
                                        "dpo.precompute_ref_log_probs must be true or false or 'auto', got 'sometimes'"),
    "recipe: `no` read as false": (["dpo", BASE, "--set", "dpo.eval_strategy=no"],
                                   "dpo.eval_strategy must be text, got False (YAML reads no, yes, on and off"),
    "recipe: number read as text": (recipe("number_as_text"),
                                    "dpo.learning_rate must be a number, got '5e-4' (YAML reads a number like 5e-4 "
                                    "as text: write 5.0e-4)"),
    "recipe: negative steps": (recipe("negative_steps"), "dpo.max_steps must be a positive integer (or -1"),
    "recipe: beta 0": (recipe("beta_zero"), "beta_zero.yaml: dpo.beta must be a positive number, got 0"),
    "recipe: negative beta override": (["dpo", BASE, "--set", "dpo.beta=-1"], "dpo.beta must be a positive number"),
    "recipe: override not YAML": (["dpo", BASE, "--set", "dpo.beta=[0.1"],
                                  "override 'dpo.beta=[0.1': the value is not valid YAML"),
    "recipe: !!python/object tag": (recipe("python_tag"), "python_tag.yaml line 6: the YAML tag "
                                    "'!!python/object/apply:os.system' is not allowed: a recipe holds plain values"),
    "recipe: not a mapping": (recipe("not_a_mapping"), "not_a_mapping.yaml: a recipe is a mapping of sections"),
    "recipe: section not a mapping": (recipe("section_not_mapping"), "section 'lora' must be a mapping"),
    "recipe: empty file": (recipe("empty"), "empty.yaml: model.name is required"),
    "recipe: name with ..": (recipe("name_traversal"), "name '../../outside' must be a plain name"),
    "recipe: absolute name": (recipe("name_absolute"), "name '/tmp/prefalign-evil' must be a plain name"),
    "recipe: name with /": (recipe("name_slash"), "name 'team/run' must be a plain name"),
    "recipe: unknown GGUF type": (recipe("unknown_gguf"), "export.gguf type 'q3_weird' is not one of f32, f16"),
    "recipe: eval_share 1": (recipe("eval_share_one"), "data.eval_share must be a number in [0, 1), got 1.0"),
    "recipe: trust_remote_code not a bool": (recipe("trust_remote_code_text"),
                                             "model.trust_remote_code must be true or false, got 'sure'"),
    "recipe: unknown dtype": (recipe("dtype_unknown"), "model.dtype must be one of auto, float32"),
    "method: ppo (not offered)": (["ppo", "tiny"], "PPO is not offered: TRL removed its PPOTrainer"),
    "recipe: ppo section": (["dpo", BASE, "--set", "ppo.beta=0.1"], "base.yaml: ppo: PPO is not offered"),
    "recipe: unknown name": (["dpo", "no-such-recipe"], "no recipe named 'no-such-recipe'; recipes: "),
    "recipe: file missing": (recipe("no_such_file"), "no_such_file.yaml does not exist"),
    # data
    "data: truncated JSONL line": (data("truncated.jsonl"), "truncated.jsonl line 4: not valid JSON"),
    "data: UTF-16": (data("utf16.jsonl"), "utf16.jsonl line 1: not UTF-8 text (it starts with a UTF-16 byte-order "
                                          "mark); save the file as UTF-8"),
    "data: Latin-1 bytes": (data("latin1.jsonl"), "latin1.jsonl line 2: not UTF-8 text (byte 0xf9"),
    "data: empty file": (data("empty.jsonl"), "empty.jsonl: the dataset is empty"),
    "data: CSV without header": (data("no_header.csv"), "no_header.csv line 2: missing 'prompt'; its columns are "
                                                        "'What is the sun?'"),
    "data: Parquet with other columns": (data("wrong_columns.parquet"),
                                         "wrong_columns.parquet row 1: missing 'prompt'; its columns are 'question', "
                                         "'good', 'bad'"),
    "data: not Parquet": (data("not_parquet.parquet"), "not_parquet.parquet: not a readable Parquet file"),
    "data: a 10 MB row": (huge_row, "no usable rows among 1 (1 longer than 1,000,000 characters)"),
    "data: row not an object": (data("row_not_object.jsonl"), "row_not_object.jsonl line 2: expected an object"),
    "data: row without rejected": (data("missing_rejected.jsonl"), "missing_rejected.jsonl line 3: missing 'rejected'"),
    "data: JSON not a list": (data("not_a_list.json"), "not_a_list.json: expected a JSON list of rows"),
    "data: unsupported file type": (data("unsupported.txt"), "unsupported.txt: unsupported file type"),
    "data: every row dropped": (data("all_dropped.jsonl"), "no usable rows among 2 (1 chosen equals rejected, "
                                                           "1 empty chosen)"),
    "data: file missing": (data("no_such_file.jsonl"), "data file tests/bad_inputs/data/no_such_file.jsonl does not "
                                                       "exist"),
    # models
    "model: no config.json": (model("no_config"), "model folder tests/bad_inputs/models/no_config has no config.json"),
    "model: no weights": (model("no_weights"), "no_weights has no weights (no *.safetensors file)"),
    "model: only pickle weights": (model("pickle_only"), "pickle_only has only pickle weights (pytorch_model.bin), "
                                                         "which can run code when loaded"),
    "model: no chat template": (model("no_chat_template"), "no_chat_template: its tokenizer has no chat template; "
                                                           "set model.chat_template"),
    "model: GPTQ checkpoint": (model("gptq"), "is stored quantized with gptq, which this app cannot dequantize"),
    "model: folder missing": (model("nowhere"), "model folder tests/bad_inputs/models/nowhere does not exist"),
    "model: not cached, offline": (["dpo", BASE, "--set", "model.name=nobody/no-such-model"],
                                   "'nobody/no-such-model' is not in the local Hugging Face cache and the hub cannot "
                                   "be reached"),
    # runs: what a command that writes accepts
    "export: RUN outside exports/": (lambda t: ["export", str(t.tmp)], "is outside exports/"),
    "export: RUN ../ out of exports/": (["export", "../app"], "../app is outside exports/"),
    "smoke: RUN outside exports/": (lambda t: ["smoke", str(t.tmp)], "is outside exports/"),
    "report: RUN outside exports/": (lambda t: ["report", str(t.tmp)], "is outside exports/"),
    "resume: RUN outside exports/": (lambda t: ["dpo", "--resume", str(t.tmp)], "is outside exports/"),
    "export: no such run": (["export", "no-such-run"], "run 'no-such-run' not found"),
    "export: run without adapter": (lambda t: ["export", str(t.run("no-adapter", {"recipe.yaml": (RECIPES / "tiny.yaml").read_text()}))],
                                    "has no adapter/ (its training did not finish)"),
    # GGUF files
    "chat: truncated GGUF": (["chat", gguf("truncated.gguf")], "llama.cpp could not load truncated.gguf: the file is "
                                                               "damaged or incomplete"),
    "chat: wrong magic": (["chat", gguf("wrong_magic.gguf")], "wrong_magic.gguf is not a GGUF file (bad magic"),
    "chat: zero bytes": (["chat", gguf("zero.gguf")], "zero.gguf is empty (0 bytes)"),
    "chat: GGUF version 99": (["chat", gguf("wrong_version.gguf")], "wrong_version.gguf is GGUF version 99"),
    "chat: no such file": (["chat", gguf("missing.gguf")],
                           "GGUF file tests/bad_inputs/gguf/missing.gguf does not exist"),
    "serve: truncated GGUF": (["serve", gguf("truncated.gguf"), "--port", "0"], "could not load truncated.gguf"),
    "smoke: truncated GGUF": (run_with_gguf("smoke", "truncated.gguf"),
                              f"tiny-f16.gguf is 16384 bytes but its run's manifest says {F16}"),
    "smoke: wrong magic": (run_with_gguf("smoke", "wrong_magic.gguf"), "tiny-f16.gguf is not a GGUF file"),
    "smoke: zero bytes": (run_with_gguf("smoke", "zero.gguf"), "tiny-f16.gguf is empty (0 bytes)"),
    "verify: truncated GGUF": (run_with_gguf("verify", "truncated.gguf"),
                               f"does not match its manifest: gguf/tiny-f16.gguf: 16384 bytes, the manifest says "
                               f"{F16}"),
    "verify: zero bytes": (run_with_gguf("verify", "zero.gguf"), "gguf/tiny-f16.gguf: 0 bytes, the manifest says"),
    "verify: no manifest": (lambda t: ["verify", str(t.folder({"recipe.yaml": "{}"}))], "has no manifest.json"),
    # preference pairs from AI feedback (each fails before any model loads, and writes nothing)
    "pairs: reward run not a reward model": (lambda t: pairs("reward", "--reward-run", str(t.folder(
        {"train.json": '{"method": "dpo"}', "recipe.yaml": "{}"}))), "run is not a finished reward run"),
    "pairs: no prompts": (["pairs", "--mode", "constitution", "--prompts", str(BAD / "data" / "no_prompts.txt"),
                           "--out", PAIRS_OUT], "no_prompts.txt has no prompts"),
    "pairs: constitution without principles": (pairs("constitution", "--constitution", constitution("no_principles")),
                                               "no_principles.yaml has no principles"),
    "pairs: principle without revision": (pairs("constitution", "--constitution", constitution("missing_revision")),
                                          "missing_revision.yaml principle 2 (polite) has no revision_request"),
}


def exports_listing() -> set[str]:
    """Every path under exports/, except inside run folders named tiny-*: other test sessions may train
    and remove their own runs meanwhile, and no case here makes a run of that name."""
    found = set()
    for folder, dirs, files in os.walk(EXPORTS):
        rel = Path(folder).relative_to(EXPORTS)
        if rel.parts and rel.parts[0].startswith("tiny"):
            continue
        found |= {str(rel / name) for name in dirs + files if not (not rel.parts and name.startswith("tiny"))}
    return found


class Scratch:
    """Where a case builds what it needs: tmp_path, and run folders in exports/ removed afterwards."""

    def __init__(self, tmp):
        self.tmp, self.runs = tmp, []

    def folder(self, files: dict, root: Path | None = None) -> Path:
        root = root or self.tmp / "run"
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
        return root

    def run(self, name: str, files: dict) -> Path:
        path = EXPORTS / f"bad-inputs-{name}-{os.getpid()}"
        self.runs.append(path)
        return self.folder(files, path)


@pytest.fixture
def scratch(tmp_path):
    s = Scratch(tmp_path)
    yield s
    for run in s.runs:
        shutil.rmtree(run, ignore_errors=True)


def assert_one_clear_line(code: int, stderr: str, expected: str):
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert code == 2, f"exit code {code}; stderr: {stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], f"expected {expected!r} in: {lines[0]}"


def run_app(*args, preexec_fn=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL,
                          preexec_fn=preexec_fn, timeout=timeout)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(case, scratch, capsys, monkeypatch):
    argv, expected = CASES[case]
    argv = argv(scratch) if callable(argv) else argv
    monkeypatch.chdir(ROOT)  # the corpus paths are relative to the repository, as a user types them
    before = exports_listing()
    if case in SUBPROCESS:
        proc = run_app(*argv)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = main(argv), capsys.readouterr().err
    assert_one_clear_line(code, err, expected)
    assert exports_listing() - before == set(), "the failed command left files in exports/"
    assert not PWNED.exists()


def test_the_corpus_has_real_files_for_every_kind():
    """At least 25 cases as files; every file of the corpus is used by a case."""
    files = [p for p in (ROOT / BAD).rglob("*") if p.is_file() and p.name not in ("README.md", "base.yaml")]
    assert len(files) >= 25 and len(CASES) >= 25
    used = " ".join(" ".join(argv) for argv, _ in CASES.values() if not callable(argv))
    used += " truncated.gguf wrong_magic.gguf zero.gguf"  # the files run_with_gguf puts in run folders
    unused = [str(p.relative_to(ROOT / BAD)) for p in files
              if (p.parent.name if p.parent.parent.name == "models" else p.name) not in used]
    assert not unused, f"corpus files no case uses: {unused}"


def test_export_with_the_disk_full_says_so_and_leaves_nothing_half_written(tiny_run, scratch):
    """`python -m app export RUN` in a process whose files may not exceed 2 MB (RLIMIT_FSIZE, with SIGXFSZ
    ignored so a write fails with EFBIG as on a full disk): the merged weights (5.5 MiB) cannot be written."""
    run = EXPORTS / f"bad-inputs-disk-full-{os.getpid()}"
    scratch.runs.append(run)
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    before = exports_listing()

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
    proc = run_app("export", str(run), preexec_fn=limit_file_size)
    assert_one_clear_line(proc.returncode, proc.stderr, f"could not write the merged model into {run.name}: File "
                                                        f"too large; free some disk space")
    assert exports_listing() - before == set()  # .merged.tmp is gone too
    assert not (run / "manifest.json").exists()  # the export had begun: the run no longer claims to be whole


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_recipe_without_gpu_or_network_is_one_clear_line():
    """As a real process: `make dpo MODEL=llama3-8b` here, with no GPU and no network (preflight says the
    first of the two it meets)."""
    proc = run_app("dpo", "llama3-8b")
    assert_one_clear_line(proc.returncode, proc.stderr, "recipe 'llama3-8b' cannot run here: ")
    assert "needs a CUDA GPU" in proc.stderr or "the hub cannot be reached" in proc.stderr


# safety: code from a model's repository, pickle weights, run folders outside exports/

def test_trust_remote_code_is_off_unless_the_recipe_turns_it_on_and_then_it_warns(caplog):
    from app.model import load_options, load_tokenizer
    from app.recipe import load_recipe

    recipe = load_recipe(BASE)
    assert recipe.model.trust_remote_code is False and recipe.model.allow_pickle is False
    assert load_options(recipe) == {"trust_remote_code": False, "use_safetensors": True}
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    trusting = load_recipe(BASE, ["model.trust_remote_code=true"])
    assert load_tokenizer(trusting).chat_template  # passed through to transformers, which accepts it
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "app.model"]
    assert any("recipe 'bad-inputs' sets model.trust_remote_code: true" in w for w in warnings), warnings


def test_pickle_weights_load_only_when_the_recipe_allows_them(monkeypatch):
    from app.model import check_model_environment, load_options
    from app.recipe import load_recipe

    monkeypatch.chdir(ROOT)
    folder = f"model.name={BAD / 'models' / 'pickle_only'}"
    with pytest.raises(AppError, match="only pickle weights"):
        check_model_environment(load_recipe(BASE, [folder]))
    allowed = load_recipe(BASE, [folder, "model.allow_pickle=true"])
    check_model_environment(allowed)  # no error: the user said they trust these files
    assert load_options(allowed)["use_safetensors"] is None  # transformers may then pick the .bin


def test_run_folders_stay_inside_exports():
    from app.runs import create_run, resolve_run

    before = exports_listing()
    for name in ("../escaped", "/tmp/escaped"):
        with pytest.raises(AppError, match="outside exports/"):
            create_run(name)
    assert exports_listing() == before and not (ROOT / "escaped").exists()
    assert resolve_run("../app") == ROOT / "app"  # reading (verify, chat) may look anywhere
    with pytest.raises(AppError, match="outside exports/"):
        resolve_run("../app", write=True)
