"""More than one process: the training stage under `accelerate launch`, one process per GPU (or CPU process).

The parent (`python -m app dpo RECIPE --processes N`) runs the preflight, makes the run folder and writes its
recipe.yaml, then launches N copies of `python -m app train-worker RUN` through accelerate: data-parallel DDP
by default (torch's gloo backend on a CPU, NCCL on GPUs), or whatever the recipe's `launch.config` (an
accelerate config file: FSDP2, DeepSpeed ZeRO) says. Every rank loads the data and the model and trains; rank 0
alone writes metrics.jsonl, preference_eval.json, train.json and the trained adapter (or weights). The parent
then exports and smoke-tests what rank 0 saved, as `python -m app export RUN` does.

A rank that fails writes one line, `rank-<r>.error` in the run folder, before it exits; the launcher then stops
the others. The parent names the first rank that failed in one sentence, from the launcher's own summary, with
that rank's line (a rank killed by a signal writes none).
"""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from app import ROOT, AppError, repo_path

ERROR_FILE = "rank-{rank}.error"
LAUNCH_LOG = "launch.log"


def launch_command(run: Path, processes: int, config: str | None, checkpoint: Path | None) -> list[str]:
    """The `accelerate launch` argument list for N workers on this machine."""
    with socket.socket() as s:  # a free port for the ranks to meet on (two launches at once do not collide)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    how = ["--config_file", str(repo_path(config))] if config else ["--multi_gpu"]  # --multi_gpu: DDP, gloo without CUDA
    return [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(port), "-m", "app", "train-worker", str(run),
            *(["--checkpoint", str(checkpoint)] if checkpoint else [])]


def launch_training(run: Path, processes: int, config: str | None, checkpoint: Path | None, log=print):
    """Run the training stage in `processes` processes; AppError naming the rank when one fails. Rank 0's
    progress lines come to stdout; every rank's stderr (warnings, tracebacks) and the launcher's go to
    launch.log in the run folder."""
    for stale in run.glob(ERROR_FILE.format(rank="*")):
        stale.unlink()
    log(f"training in {processes} processes: accelerate launch, "
        + (f"config {config}" if config else "data-parallel (DDP)") + f"; their stderr: {run.name}/{LAUNCH_LOG}")
    with open(run / LAUNCH_LOG, "a") as stderr:
        code = subprocess.call(launch_command(run, processes, config, checkpoint), cwd=ROOT, stderr=stderr,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    if code != 0:
        raise AppError(failure_sentence(run, processes, (run / LAUNCH_LOG).read_text()[-20000:], code))


def failure_sentence(run: Path, processes: int, launcher_output: str, code: int) -> str:
    """Which rank failed first and why, in one sentence. The launcher's summary names the first rank that
    failed (its "Root Cause"); the others are stopped after it, and may have written an error of their own
    (a lost connection to the first). A rank's own error file says why; a rank killed by a signal has none."""
    rank, why = None, None
    root = launcher_output.rpartition("Root Cause")[2]
    found = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", root, re.S) if root else None
    if found:
        rank, exitcode = int(found[1]), int(found[2])
        why = f"killed by signal {-exitcode}" if exitcode < 0 else f"exit code {exitcode}"
    errors = {r: run / ERROR_FILE.format(rank=r) for r in range(processes)}
    if rank is None:
        rank = next((r for r, path in errors.items() if path.is_file()), None)
    if rank is not None and errors[rank].is_file():
        why = errors[rank].read_text().strip()
    where = f"on rank {rank} of {processes}" if rank is not None else f"in {processes} processes"
    return (f"training stopped {where}: {why or f'accelerate launch exit code {code}'} (every rank's stderr: "
            f"{run.name}/{LAUNCH_LOG}); once fixed, resume with --resume {run.name}")


def record_failure(run: Path, error: BaseException):
    """In a worker: the one line the parent reads (an AppError's message, else the exception's type and text)."""
    rank = int(os.environ.get("RANK", "0"))
    text = str(error) if isinstance(error, AppError) else f"{type(error).__name__}: {error}"
    (run / ERROR_FILE.format(rank=rank)).write_text(text.splitlines()[0] if text else type(error).__name__)


def load_cpu_rank_checkpoints():
    """On CPU ranks, accelerate names the device "cpu:0" and Trainer's resume loads the optimizer state with
    map_location="cpu:0", a location torch.load does not know ("don't know how to restore data location ...
    cpu:0"). torch's own extension point for locations teaches it that "cpu:<n>" is the CPU."""
    import torch

    def restore(storage, location):
        return storage if location.startswith("cpu:") else None

    torch.serialization.register_package(99, lambda storage: None, restore)
