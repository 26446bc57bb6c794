"""A local web app over the same app: label preference pairs, train on them, read the runs, compare base and
aligned, chat. FastAPI under uvicorn; the pages are plain HTML with a little JavaScript (app/ui_static/).

    python -m app ui [--port 8765]     prints http://127.0.0.1:PORT/?token=... ; open that address

It does nothing of its own: replies come from app/generate.py's llama.cpp path, training is `python -m app
METHOD ...` as a child process (the CLI itself), the runs table is `python -m app runs`'s, and the pages read
the run folders in exports/.

Security, as for a Jupyter server: it listens on 127.0.0.1 unless --host says otherwise, and beyond loopback
only with an API key (app/serve.py exposure_verdict), which then is the token. Every request carries the
token (the printed URL's ?token= sets a cookie; the pages send it as the X-Token header); a request that
changes anything (POST) must send the header itself, from the page's own origin. Every path a request names
lies in exports/ or recipes/.
"""
import collections
import contextlib
import datetime
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Literal

from app import ROOT, AppError, child_env
from app.chat import fit_history, recipe_system
from app.data import prompt_key, read_local_rows, read_prompt_list
from app.export import BASE_GGUF
from app.generate import CONTEXT, GGUFModel, Sampling, one_turn, with_system
from app.gguf import check_gguf_file, find_gguf
from app.methods import METHODS
from app.progress import read_events
from app.recipe import recipe_names, run_recipe
from app.runs import ACCURACY_KEYS, EXPORTS, MARGIN_KEYS, read_metrics
from app.serve import exposure_verdict, listen

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "ui_static"
PAGES = ("label", "train", "runs", "compare", "chat")
ALLOWED_ROOTS = (EXPORTS, ROOT / "recipes")  # every path a request names lies in one of these
COOKIE = "prefalign_ui_token"
CHART_KEYS = {"loss": ("loss",), "accuracy": ACCURACY_KEYS, "margin": MARGIN_KEYS}  # what the chart draws


def ui(host: str = "127.0.0.1", port: int = 8765, api_key: str | None = None, insecure: bool = False):
    """Serve until Ctrl-C (or SIGTERM); a training started from the page is interrupted on the way out."""
    exposure = exposure_verdict(host, api_key, insecure)
    if exposure == "refused":
        raise AppError(f"--host {host} is reachable from other machines and there is no API key; give --api-key KEY "
                       f"(or set PREFALIGN_API_KEY), listen on 127.0.0.1, or pass --insecure to allow it anyway")
    if exposure == "open":
        logger.warning(f"--insecure: listening on {host} without an API key; the printed token is the only lock")
    import uvicorn

    token = api_key or secrets.token_urlsafe(24)
    sock = listen(host, port)
    app = create_app(token)
    shown = f"[{host}]" if ":" in host else host
    print(f"prefalign web app: http://{shown}:{port}/?token={token}  (Ctrl-C stops)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: None)  # as serve: uvicorn shuts down, then ui() returns
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        app.state.training.stop()


# ---------------------------------------------------------------- paths a request names

def project_path(name: str, suffixes: tuple[str, ...] = ()) -> Path:
    """A path under exports/ or recipes/ (relative to the repository, or absolute), resolved; AppError for
    anything else, '..' included, so a request cannot read or write elsewhere."""
    if not name or ".." in Path(name).parts:
        raise AppError(f"'{name}': give a path inside exports/ or recipes/, without '..'")
    path = (ROOT / name).resolve()
    if not any(path.is_relative_to(root.resolve()) for root in ALLOWED_ROOTS):
        raise AppError(f"'{name}' is outside the project's exports/ and recipes/ folders")
    if suffixes and not path.name.endswith(suffixes):
        raise AppError(f"'{name}': expected a {' or '.join(suffixes)} file")
    return path


def shown_path(path: Path) -> str:
    return str(path.relative_to(ROOT.resolve()))


def run_folder(name: str) -> Path:
    """A run folder in exports/ by its name (or `latest`)."""
    run = project_path(f"exports/{name}")
    if "/" in name or not (run / "recipe.yaml").is_file():
        raise AppError(f"no run named '{name}' in exports/")
    return run


def gguf_file(name: str) -> Path:
    path = project_path(name, (".gguf",))
    if not path.is_file():
        raise AppError(f"GGUF file {name} does not exist")
    check_gguf_file(path)
    return path


# ---------------------------------------------------------------- llama.cpp models, loaded once each

class LoadedModels:
    """GGUFModels by file, each loaded on first use and kept. llama.cpp's objects are not thread-safe, so a
    model answers one request at a time (its own lock); different models answer at once."""

    def __init__(self):
        self.lock, self.entries = threading.Lock(), {}

    @contextlib.contextmanager
    def use(self, path: Path):
        with self.lock:
            entry = self.entries.setdefault(path, {"lock": threading.Lock(), "model": None})
        with entry["lock"]:
            if entry["model"] is None:
                entry["model"] = GGUFModel(path, n_ctx=CONTEXT)
            yield entry["model"]


# ---------------------------------------------------------------- labels

def undecided_file(labels: Path) -> Path:
    """Ties and skips go beside the pairs, not among them: app/data.py reads every row of the labels file as
    a training pair, and a tie has no chosen side."""
    return labels.with_name(labels.name.removesuffix(".jsonl") + ".undecided.jsonl")


def append_line(path: Path, row: dict):
    """One JSON line, on disk before this returns (a crash loses at most the choice being made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_label_rows(path: Path) -> list[dict]:
    """The rows of a labels file as app/data.py reads them ([] before the first choice)."""
    return [row for _, row in read_local_rows(path)] if path.is_file() else []


def as_messages(prompt) -> list[dict]:
    return one_turn(prompt) if isinstance(prompt, str) else prompt


def label_choices(labels: Path) -> dict[str, str]:
    """{prompt key (app/data.py prompt_key): pair, tie or skip} of the labels file and its undecided one."""
    return {prompt_key(as_messages(row["prompt"])): row.get("choice", "pair")
            for row in read_label_rows(labels) + read_label_rows(undecided_file(labels))}


def label_progress(prompts: list[list[dict]], labels: Path) -> dict:
    """The counts of pairs, ties and skips, and the first prompt labeled in neither file (None when done)."""
    choices = label_choices(labels)
    counts = collections.Counter(choices.values())
    index = next((i for i, p in enumerate(prompts) if prompt_key(p) not in choices), len(prompts))
    return {"total": len(prompts), "index": index, "pairs": counts["pair"], "ties": counts["tie"],
            "skips": counts["skip"], "prompt": prompts[index] if index < len(prompts) else None}


def label_row(prompt: list[dict], choice: str, a: str, b: str, chosen_text: str | None, provenance: dict) -> dict:
    """The line to append: a pair in app/data.py's standard format (prompt, chosen, rejected; `provenance` is
    a column it ignores), or a tie or skip with both replies for the undecided file."""
    prompt_value = prompt[0]["content"] if len(prompt) == 1 else prompt  # one turn: a plain string, as data.py reads
    if choice in ("tie", "skip"):
        return {"prompt": prompt_value, "choice": choice, "replies": [a, b], "provenance": provenance}
    picked, other = (a, b) if choice == "a" else (b, a)
    chosen = (chosen_text if chosen_text is not None else picked).strip()
    if not chosen:
        raise AppError("the preferred reply is empty; write one, or record a tie or a skip")
    if chosen == other.strip():
        raise AppError("the preferred reply is the same as the other one, so there is nothing to prefer; record a "
                       "tie, or edit the preferred reply")
    return {"prompt": prompt_value, "chosen": chosen, "rejected": other,
            "provenance": {**provenance, "edited": chosen != picked.strip()}}


# ---------------------------------------------------------------- training: the CLI as a child process

class TrainingJob:
    """`python -m app METHOD RECIPE --set ...` in a process of its own (its own session, so Stop reaches the
    children it starts too); its output lines are kept, and its run folder is learnt from the progress
    events it writes (app/progress.py), not from its printed text."""

    def __init__(self, argv: list[str]):
        self.argv, self.lines, self.run = argv, [], None
        self.events = Path(tempfile.mkdtemp(prefix="prefalign-ui-")) / "progress.jsonl"
        env = child_env(PREFALIGN_PROGRESS=str(self.events), PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen([sys.executable, "-m", "app", *argv], cwd=ROOT, env=env, text=True,
                                        errors="replace", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
        self.process.wait()
        self.run_name()  # kept, before its events file goes
        shutil.rmtree(self.events.parent, ignore_errors=True)

    def running(self) -> bool:
        return self.reader.is_alive()

    def run_name(self) -> str | None:
        if self.run is None:
            folders = [e["path"] for e in read_events(self.events) if e["event"] == "folder"]
            self.run = Path(folders[-1]).name if folders else None
        return self.run

    def stop(self):
        """SIGINT, as Ctrl-C: the CLI stops where it is, says `interrupted` and exits 130."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)


class Training:
    """The one training started from the page (the CPU or GPU has room for one)."""

    def __init__(self):
        self.job: TrainingJob | None = None
        self.lock = threading.Lock()  # two clicks on Start, answered in two threads, start one training

    def start(self, argv: list[str]) -> TrainingJob:
        with self.lock:
            if self.job and self.job.running():
                raise AppError("a training is already running; stop it first")
            self.job = TrainingJob(argv)
            return self.job

    def stop(self):
        if self.job:
            self.job.stop()


def training_argv(method: str, recipe: str, data_source: str | None, max_steps: int | None, beta: float | None,
                  learning_rate: float | None, export_base: bool) -> list[str]:
    """The CLI's arguments for the form's choices (the CLI checks the values, as for any command line)."""
    if method not in METHODS:
        raise AppError(f"no method '{method}'; methods: {', '.join(METHODS)}")
    if recipe not in recipe_names():
        raise AppError(f"no recipe named '{recipe}' in recipes/")
    argv = [method, recipe]
    if data_source:
        source = project_path(data_source, (".jsonl", ".json", ".csv", ".parquet"))
        argv += ["--set", f"data.source={shown_path(source)}"]
    for key, value in (("max_steps", max_steps), ("beta", beta), ("learning_rate", learning_rate)):
        if value is not None:
            argv += ["--set", f"{method}.{key}={value}"]
    if export_base:
        argv += ["--set", "export.base=true"]  # the base's GGUF, for the Compare page
    return argv


def chart_points(run: Path) -> list[dict]:
    """{step, loss, accuracy, margin} per training log line of metrics.jsonl (None where not logged)."""
    points = []
    for record in read_metrics(run):
        if "loss" in record:
            points.append({"step": record["step"], **{name: next((record[k] for k in keys if k in record), None)
                                                       for name, keys in CHART_KEYS.items()}})
    return points


# ---------------------------------------------------------------- the runs

def run_status(run: Path) -> str:
    if (run / "manifest.json").is_file():
        return "finished"
    return "trained, exporting" if (run / "train.json").is_file() else "training (or stopped)"


def run_details(run: Path) -> dict:
    """What the Runs page shows of one run: its report, smoke table, model card and plots, as written."""
    def text(rel: str) -> str | None:
        path = run / rel
        return path.read_text(encoding="utf-8") if path.is_file() else None

    smoke = text("smoke.json")
    return {"run": run.name, "status": run_status(run), "report": text("report.md"), "compare": text("compare.md"),
            "smoke": json.loads(smoke) if smoke else None, "card": text("gguf/README.md") or text("merged/README.md"),
            "plots": sorted(p.name for p in (run / "plots").glob("*.png")),
            "ggufs": [shown_path(p) for p in sorted((run / "gguf").glob("*.gguf"))],
            "base_gguf": shown_path(run / BASE_GGUF) if (run / BASE_GGUF).is_file() else None,
            "probes": run_probes(run)}


def run_probes(run: Path) -> list[str]:
    return list(run_recipe(run).export.probes)


def run_folders() -> list[Path]:
    """The run folders in exports/, newest first (a folder with a recipe.yaml; not `latest`, not labels)."""
    return sorted((p for p in EXPORTS.iterdir() if p.is_dir() and not p.is_symlink() and (p / "recipe.yaml").is_file()),
                  key=lambda p: p.stat().st_mtime, reverse=True)


def model_choices() -> list[dict]:
    """Every GGUF of every run, the base's too: {path, run, label}."""
    out = []
    for run in run_folders():
        for path in sorted((run / "gguf").glob("*.gguf")) + sorted((run / BASE_GGUF.parent).glob("*.gguf")):
            out.append({"path": shown_path(path), "run": run.name,
                        "label": f"{run.name} / {path.name}" + (" (base)" if path.parent.name == BASE_GGUF.parent.name
                                                                 else "")})
    return out


def data_files(kind: str) -> list[str]:
    """Files to pick from: prompts (text or JSONL with prompts) or training data, in recipes/data/ and exports/
    (labels included, their undecided files not)."""
    suffixes = (".txt", ".jsonl") if kind == "prompts" else (".jsonl", ".json", ".csv", ".parquet")
    found = []
    for folder, pattern in ((ROOT / "recipes" / "data", "*"), (EXPORTS, "*"), (EXPORTS, "*/*")):
        for path in sorted(folder.glob(pattern)):
            in_run = (path.parent / "recipe.yaml").is_file()  # a run's own files are not data
            if path.is_file() and path.suffix in suffixes and not path.name.endswith(".undecided.jsonl") and not in_run:
                found.append(shown_path(path.resolve()))
    return list(dict.fromkeys(found))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the web app

def create_app(token: str):
    """The FastAPI app; `token` is what every request must carry."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel

    app = FastAPI(title="prefalign", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models, app.state.training = LoadedModels(), Training()
    labels_lock = threading.Lock()

    def same(given: str | None) -> bool:
        return bool(given) and secrets.compare_digest(given.encode(), token.encode())

    def cross_origin(request: Request) -> bool:
        origin, own = request.headers.get("origin"), f"{request.url.scheme}://{request.headers.get('host')}"
        return (origin is not None and origin != own) or request.headers.get("sec-fetch-site") not in (
            None, "same-origin", "none")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        query_token = request.query_params.get("token")
        if not (same(request.headers.get("x-token")) or same(request.cookies.get(COOKIE)) or same(query_token)):
            return JSONResponse({"error": "no valid token: open the address `python -m app ui` printed, with its "
                                          "?token="}, status_code=403)
        if request.method not in ("GET", "HEAD"):
            if not same(request.headers.get("x-token")):
                return JSONResponse({"error": "a change needs the token in the X-Token header"}, status_code=403)
            if cross_origin(request):
                return JSONResponse({"error": "cross-origin request refused"}, status_code=403)
        response = await call_next(request)
        if same(query_token):  # the pages read it from the cookie and send it back as X-Token
            response.set_cookie(COOKIE, token, samesite="strict")
        return response

    @app.exception_handler(AppError)
    async def app_error(request: Request, error: AppError):
        return JSONResponse({"error": str(error)}, status_code=400)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def home():
        return RedirectResponse("/label")

    for page in PAGES:
        app.add_api_route(f"/{page}", lambda page=page: FileResponse(STATIC / f"{page}.html"), methods=["GET"])

    @app.get("/api/choices")
    def choices():
        return {"models": model_choices(), "prompts": data_files("prompts"), "data": data_files("data"),
                "recipes": recipe_names(), "methods": list(METHODS),
                "runs": [{"run": r.name, "status": run_status(r)} for r in run_folders()]}

    # ---- label
    def prompts_of(name: str) -> list[list[dict]]:
        return read_prompt_list(str(project_path(name, (".txt", ".jsonl"))))

    def labels_path(name: str) -> Path:
        path = project_path(name, (".jsonl",))
        if not path.is_relative_to(EXPORTS.resolve()) or path.name.endswith(".undecided.jsonl"):
            raise AppError(f"'{name}': labels are written into exports/, as NAME.jsonl")
        return path

    @app.get("/api/label/state")
    def label_state(prompts: str, labels: str):
        return label_progress(prompts_of(prompts), labels_path(labels))

    class Sampled(BaseModel):
        model: str
        prompts: str
        index: int
        temperature: float = 0.8
        top_p: float = 0.95
        max_tokens: int = 128
        seed: int = 0

        def sampling(self) -> Sampling:
            if not (0 < self.max_tokens < CONTEXT and self.temperature > 0):
                raise AppError(f"sampling needs a temperature above 0 and 0 < max tokens < {CONTEXT}")
            return Sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed)

        def prompt(self) -> list[dict]:
            prompts = prompts_of(self.prompts)
            if not 0 <= self.index < len(prompts):
                raise AppError(f"{self.prompts} has {len(prompts)} prompts; there is no prompt {self.index + 1}")
            return prompts[self.index]

    @app.post("/api/label/replies")
    def label_replies(body: Sampled):
        """Two replies to the prompt, sampled with the seeds `seed` and `seed + 1`."""
        gguf, messages = gguf_file(body.model), body.prompt()
        with app.state.models.use(gguf) as model:
            messages = with_system(recipe_system(gguf), messages)
            model.check_fits(messages, body.max_tokens)
            a, b = model.replies(messages, body.sampling(), n=2)
        return {"a": a, "b": b}

    class Choice(Sampled):
        labels: str
        choice: Literal["a", "b", "tie", "skip"]
        a: str
        b: str
        chosen_text: str | None = None  # the preferred reply as edited (None: as sampled)

    @app.post("/api/label/choose")
    def label_choose(body: Choice):
        labels, prompt, sampling = labels_path(body.labels), body.prompt(), body.sampling()
        provenance = {"model": shown_path(gguf_file(body.model)), "prompts": body.prompts, "time": now(),
                      "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                   "max_tokens": sampling.max_tokens, "seeds": [sampling.seed, sampling.seed + 1]}}
        row = label_row(prompt, body.choice, body.a, body.b, body.chosen_text, provenance)
        with labels_lock:  # two tabs on one file: the second choice for a prompt is refused, not appended
            if prompt_key(prompt) in label_choices(labels):
                raise AppError("this prompt is labeled already (in another tab?); reload the page")
            append_line(labels if "chosen" in row else undecided_file(labels), row)
        return label_progress(prompts_of(body.prompts), labels)

    # ---- train
    class TrainForm(BaseModel):
        method: str = "dpo"
        recipe: str = "tiny"
        data_source: str | None = None
        max_steps: int | None = None
        beta: float | None = None
        learning_rate: float | None = None
        export_base: bool = True

    @app.post("/api/train/start")
    def train_start(form: TrainForm):
        argv = training_argv(form.method, form.recipe, form.data_source, form.max_steps, form.beta,
                             form.learning_rate, form.export_base)
        app.state.training.start(argv)
        return {"command": "python -m app " + " ".join(argv)}

    @app.post("/api/train/stop")
    def train_stop():
        app.state.training.stop()
        return {"stopping": True}

    @app.get("/api/train/status")
    def train_status(since: int = 0):
        job = app.state.training.job
        if job is None:
            return {"job": None}
        return {"job": {"command": "python -m app " + " ".join(job.argv), "running": job.running(),
                        "returncode": job.process.returncode if not job.running() else None, "run": job.run_name(),
                        "lines": job.lines[since:], "next": len(job.lines)}}

    # ---- runs
    @app.get("/api/runs")
    def runs():
        from app.report import list_runs
        rows = list_runs("run", descending=True)
        finished = {r["run"] for r in rows}
        return {"table": rows, "others": [{"run": r.name, "status": run_status(r)} for r in run_folders()
                                          if r.name not in finished]}

    @app.get("/api/runs/{name}")
    def run(name: str):
        return run_details(run_folder(name))

    @app.get("/api/runs/{name}/metrics")
    def metrics(name: str):
        folder = run_folder(name)
        return {"points": chart_points(folder), "status": run_status(folder)}

    @app.get("/runs/{name}/plots/{file}")
    def plot(name: str, file: str):
        path = project_path(f"exports/{name}/plots/{file}", (".png",))
        if "/" in name or path.parent != run_folder(name) / "plots" or not path.is_file():
            raise AppError(f"no plot {file} in run {name}")
        return FileResponse(path)

    # ---- compare and chat
    class CompareForm(BaseModel):
        run: str
        prompt: str
        max_tokens: int = 128

    @app.post("/api/compare")
    def compare(form: CompareForm):
        """Greedy replies of the base's GGUF and the run's own (the one chat uses), as app/compare.py."""
        folder = run_folder(form.run)
        aligned, base = find_gguf(str(folder)), folder / BASE_GGUF
        sampling = Sampling(max_tokens=form.max_tokens)
        if not (0 < form.max_tokens < CONTEXT):
            raise AppError(f"max tokens must be between 1 and {CONTEXT - 1}")

        def reply(gguf: Path) -> str:
            with app.state.models.use(gguf) as model:
                return model.replies_to([form.prompt], sampling, recipe_system(aligned))[0]

        return {"aligned": reply(aligned), "aligned_gguf": shown_path(aligned.resolve()),
                "base": reply(base) if base.is_file() else None,
                "base_missing": None if base.is_file() else (
                    f"{folder.name} has no base GGUF ({BASE_GGUF}): it is written when the recipe sets export.base: "
                    f"true (the Train page's 'base GGUF' box); `make compare RUN={folder.name}` runs the base "
                    f"through transformers instead")}

    class ChatForm(BaseModel):
        model: str
        turns: list[dict]  # user and assistant messages, ending with the user's
        system: str | None = None  # None: the run's export.system
        max_tokens: int = 256
        temperature: float = 0.7
        top_p: float = 0.95
        seed: int = 0

    @app.post("/api/chat")
    def chat(form: ChatForm):
        gguf = gguf_file(form.model)
        if not form.turns or form.turns[-1].get("role") != "user":
            raise AppError("the conversation must end with the user's message")
        system = recipe_system(gguf) if form.system is None else form.system or None
        sampling = Sampling(max_tokens=form.max_tokens, temperature=form.temperature, top_p=form.top_p,
                            seed=form.seed)
        with app.state.models.use(gguf) as model:
            turns = fit_history(model.prompt_tokens, system, form.turns, form.max_tokens, model.n_ctx)
            reply = model.replies(with_system(system, turns), sampling)[0]
        return {"reply": reply, "kept_turns": len(turns)}

    return app
