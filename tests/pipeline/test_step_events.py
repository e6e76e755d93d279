"""Step states printed by a pipeline's driver and read back from its logs (what ``detkd jobs`` shows)."""

from __future__ import annotations

import io

import pytest

from detkd.pipeline.events import emit, job_steps, parse, reporting, summary


def lines(*calls) -> str:
    out = io.StringIO()
    for step, state, *error in calls:
        emit(step, state, error=error[0] if error else "", out=out)
    return out.getvalue()


def test_states_read_back_from_logs_mixed_with_other_output():
    logs = "\n".join(
        [
            "teacher t_a: fcos tiny",
            lines(("data", "running"), ("data", "finished"), ("t_a", "running"), ("t_b", "running")),
            "(RayTrainWorker pid=123) epoch 1 loss 2.1",
            "detkd-step {not json}",  # looks like ours, is not: ignored
            lines(("t_b", "failed", "RuntimeError: loss is nan\nTraceback ..."), ("t_a", "finished"), ("s", "blocked")),
        ]
    )
    states = parse(logs)
    assert {name: s.state for name, s in states.items()} == {
        "data": "finished",
        "t_a": "finished",
        "t_b": "failed",
        "s": "blocked",
    }
    assert states["t_b"].error == "RuntimeError: loss is nan"  # first line only
    assert states["t_a"].seconds is not None and states["t_a"].seconds >= 0
    assert states["s"].started is None and states["s"].seconds is None


def test_job_steps_fill_in_steps_not_started_and_mark_those_cut_short():
    logs = lines(("data", "running"), ("data", "finished"), ("t_a", "running"))
    names = ["data", "t_a", "t_b", "student", "evaluate"]
    while_running = job_steps(names, logs, job_status="RUNNING")
    assert [(s.step, s.state) for s in while_running] == [
        ("data", "finished"),
        ("t_a", "running"),
        ("t_b", "pending"),
        ("student", "pending"),
        ("evaluate", "pending"),
    ]
    assert summary(while_running) == "1/5 finished, 1 running"
    after_stop = job_steps(names, logs, job_status="STOPPED")
    assert [s.state for s in after_stop] == ["finished", "stopped", "not run", "not run", "not run"]
    assert summary(after_stop) == "1/5 finished, 1 stopped, 3 not run"


def test_a_rerun_in_the_same_logs_wins_and_unlisted_steps_still_show():
    logs = lines(
        ("t_a", "running"), ("t_a", "failed", "boom"), ("t_a", "running"), ("t_a", "finished"), ("x", "running")
    )
    states = job_steps(["t_a"], logs, job_status="SUCCEEDED")
    assert [(s.step, s.state, s.error) for s in states] == [("t_a", "finished", ""), ("x", "stopped", "")]


def test_reporting_marks_failure_and_reraises():
    out = io.StringIO()
    with reporting("evaluate", out=out):
        pass
    with pytest.raises(ValueError, match="no split"):
        with reporting("register", out=out):
            raise ValueError("no split")
    states = parse(out.getvalue())
    assert states["evaluate"].state == "finished"
    assert states["register"].state == "failed" and states["register"].error == "ValueError: no split"
    with pytest.raises(ValueError, match="unknown step state"):
        emit("x", "done", out=out)
