"""Structured progress of a run: each stage says when it starts, ends or fails, as events.

The console prints its own lines as before; these events are for whoever needs to know what happened
without parsing printed text: the run's wall time per stage (the last console line and timings.json),
gpu-check (which stage a failed pipeline was in), and any process watching a run. With PREFALIGN_PROGRESS
set to a file, every event is also appended there as one JSON line, the moment it happens.
"""
import contextlib
import json
import os
import time



class Progress:
    def __init__(self, path: str | None = None):
        self.path = path if path is not None else os.environ.get("PREFALIGN_PROGRESS")
        self.seconds: dict[str, float] = {}
        self.started: dict[str, float] = {}  # the stages under way, so timings written inside one include it
        self.start = time.monotonic()

    def event(self, stage: str, what: str, **extra):
        """One event: `what` is start, end or failed (or folder: stage "run", the run folder's path)."""
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.monotonic() - self.start, 2), "stage": stage, "event": what,
                                    **extra}) + "\n")

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time the block as stage `name` (added up when a stage runs more than once)."""
        t0 = self.started[name] = time.monotonic()
        self.event(name, "start")
        try:
            yield
        except BaseException as e:
            self.event(name, "failed", error=f"{type(e).__name__}: {e}"[:500])
            raise
        finally:
            del self.started[name]
            self.add(name, time.monotonic() - t0)
        self.event(name, "end", seconds=round(time.monotonic() - t0, 1))

    def add(self, name: str, seconds: float):
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 1)

    def so_far(self) -> dict[str, float]:
        """{stage: seconds} of the stages that ended and, until now, of those under way."""
        out = dict(self.seconds)
        for name, t0 in self.started.items():
            out[name] = round(out.get(name, 0.0) + time.monotonic() - t0, 1)
        return out

    def line(self) -> str:
        """time: preflight 0.2s, load 31s, ... (total 380s)"""
        parts = [f"{name} {s:.0f}s" if s >= 10 else f"{name} {s:.1f}s" for name, s in self.seconds.items()]
        return f"time: {', '.join(parts)} (total {time.monotonic() - self.start:.0f}s)"


def read_events(path) -> list[dict]:
    """The events a run appended to its PREFALIGN_PROGRESS file (none when there is no file)."""
    try:
        text = open(path).read()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def stage_seconds(events: list[dict]) -> dict:
    """{stage: seconds} of the stages that ended, and of a stage under way or failed: until the last event."""
    out, started = {}, {}
    for e in events:
        if e["event"] == "start":
            started[e["stage"]] = e["time"]
        elif e["event"] in ("end", "failed"):  # not "folder", which names the run folder
            out[e["stage"]] = round(out.get(e["stage"], 0.0) + e["time"] - started.pop(e["stage"], e["time"]), 1)
    end = events[-1]["time"] if events else 0.0
    for stage, t in started.items():
        out[stage] = round(out.get(stage, 0.0) + end - t, 1)
    return out


def last_stage(events: list[dict]) -> str | None:
    """The stage a run was in when its events stopped: the last one started (None before any)."""
    starts = [e["stage"] for e in events if e["event"] == "start"]
    return starts[-1] if starts else None
