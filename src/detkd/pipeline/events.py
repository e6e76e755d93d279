"""Pipeline step states as marked lines in the driver's output, read back by ``detkd jobs``.

A pipeline submitted to a Ray cluster runs in a job driver the laptop cannot reach, but its
logs can be read through the Ray Jobs API. So the driver prints one marked line each time a
step changes state, and ``detkd jobs status`` folds those lines into a table, with the step
names the submission recorded in the job's metadata, so steps that never started show too.
"""

from __future__ import annotations

import json
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

MARKER = "detkd-step"
STATES = ("running", "finished", "failed", "blocked")
# job metadata holding the pipeline's step names in DAG order (a JSON list), set by ``detkd submit``
STEPS_METADATA = "detkd.steps"
_LINE = re.compile(rf"{MARKER} (\{{.*\}})\s*$")


def emit(step: str, state: str, *, error: str = "", out=None) -> None:
    """Print one state change of ``step`` as a marked line (``out`` defaults to stdout, flushed)."""
    if state not in STATES:
        raise ValueError(f"unknown step state {state!r}; one of {STATES}")
    event = {"step": step, "state": state, "time": round(time.time(), 3)}
    if error.strip():
        event["error"] = error.strip().splitlines()[0][:300]
    stream = out or sys.stdout
    stream.write(f"{MARKER} {json.dumps(event)}\n")
    stream.flush()


def describe(error: BaseException) -> str:
    """How a failure reads in a step's line: the exception's type and message."""
    return f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class StepState:
    step: str
    state: str  # running, finished, failed, blocked; pending or not run when no line names the step
    started: float | None = None  # Unix time of the last "running" line
    ended: float | None = None
    error: str = ""

    @property
    def seconds(self) -> float | None:
        return None if self.started is None or self.ended is None else self.ended - self.started


def parse(text: str) -> dict[str, StepState]:
    """Each step's latest state from a driver's logs (later lines win; a rerun's lines follow the first's)."""
    states: dict[str, StepState] = {}
    for line in text.splitlines():
        found = _LINE.search(line)
        if not found:
            continue
        try:
            event = json.loads(found.group(1))
            name, state, at = str(event["step"]), str(event["state"]), float(event["time"])
        except (ValueError, KeyError, TypeError):
            continue  # a line that only looks like ours (a user's print): not a state change
        if state not in STATES:
            continue
        before = states.get(name)
        if state == "running":
            states[name] = StepState(name, state, started=at)
        else:
            started = before.started if before is not None else None
            states[name] = StepState(name, state, started=started, ended=at, error=str(event.get("error", "")))
    return states


def job_steps(names: list[str], text: str, *, job_status: str) -> list[StepState]:
    """One state per step in ``names`` (then any others the logs name); steps with no line yet are
    ``pending`` while the job runs and ``not run`` once it has ended; a step still ``running`` when
    the job ended was cut short (``stopped``)."""
    seen = parse(text)
    ended = job_status in ("SUCCEEDED", "FAILED", "STOPPED")
    out = []
    for name in [*names, *[n for n in seen if n not in names]]:
        state = seen.get(name)
        if state is None:
            out.append(StepState(name, "not run" if ended else "pending"))
        elif state.state == "running" and ended:
            out.append(StepState(name, "stopped", started=state.started))
        else:
            out.append(state)
    return out


def summary(states: list[StepState]) -> str:
    """``3/5 finished, 1 running`` for a job list."""
    counts: dict[str, int] = {}
    for state in states:
        counts[state.state] = counts.get(state.state, 0) + 1
    head = f"{counts.pop('finished', 0)}/{len(states)} finished"
    rest = [f"{n} {s}" for s, n in counts.items() if s != "pending"]
    return ", ".join([head, *rest])


@contextmanager
def reporting(step: str, *, out=None):
    """``running`` now, then ``finished``, or ``failed`` with the error; an interrupt prints nothing more
    (the job's end marks a step left running as stopped)."""
    emit(step, "running", out=out)
    try:
        yield
    except Exception as exc:
        emit(step, "failed", error=describe(exc), out=out)
        raise
    emit(step, "finished", out=out)
