"""The DAG built from each shipped pipeline spec, and ``detkd plan`` on real files (no Ray, nothing trained)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from detkd.cli import app
from detkd.pipeline.dag import PipelineDag, Step, build_dag, execute, format_dag
from detkd.pipeline.load import load_pipeline

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "pipelines"
runner = CliRunner()


def dag_of(name: str):
    return build_dag(load_pipeline(PIPELINES / f"{name}.yaml"))


def needs(dag) -> dict[str, tuple[str, ...]]:
    return {s.name: s.needs for s in dag.steps}


def test_quickstart_dag_has_teachers_beside_the_baseline_and_registration_last():
    dag = dag_of("quickstart")
    assert needs(dag) == {
        "data": (),
        "teacher": ("data",),
        "student_baseline": ("data",),
        "student_ssim": ("data", "teacher"),
        "evaluate": ("teacher", "student_baseline", "student_ssim"),
        "register": ("evaluate",),
    }
    assert dag.waves() == [["data"], ["teacher", "student_baseline"], ["student_ssim"], ["evaluate"], ["register"]]
    assert dag.step("student_ssim").kind == "student" and "ssim" in dag.step("student_ssim").detail


def test_progressive_stages_run_in_order_each_after_its_own_teacher():
    dag = dag_of("progressive")
    assert dag.names == [
        "data",
        "teacher_weak",
        "teacher_strong",
        "student_baseline",
        "student_progressive-stage1",
        "student_progressive",
        "evaluate",
    ]
    assert dag.step("student_progressive-stage1").needs == ("data", "teacher_weak")
    assert dag.step("student_progressive").needs == ("data", "student_progressive-stage1", "teacher_strong")
    assert {s.kind for s in dag.steps if s.name.startswith("student_progressive")} == {"stage"}
    # the student is scored once, under its own name (its last stage)
    assert "student_progressive-stage1" not in dag.step("evaluate").needs
    assert dag.waves()[1] == ["teacher_weak", "teacher_strong", "student_baseline"]
    # what a failure stops: the stage chain and everything behind it, not the other teacher or the baseline
    assert dag.dependants(["teacher_weak"]) == ["student_progressive-stage1", "student_progressive", "evaluate"]
    assert dag.drawn_needs("student_progressive") == ["student_progressive-stage1", "teacher_strong"]


def test_independent_teachers_are_ready_together_once_data_is_done():
    dag = dag_of("two_teachers")
    assert dag.ready(done=[]) == ["data"]
    assert dag.ready(done=["data"]) == ["teacher_narrow", "teacher", "student_baseline"]
    assert dag.ready(done=["data"], running=["teacher"]) == ["teacher_narrow", "student_baseline"]
    assert dag.ready(done=["data", "teacher"]) == ["teacher_narrow", "student_baseline", "student_mgd"]
    assert "register" not in dag.names  # two_teachers registers nothing


def test_a_tune_step_needs_the_teachers_its_trials_learn_from(tmp_path):
    spec = yaml.safe_load((PIPELINES / "quickstart.yaml").read_text())
    spec["workdir"] = str(tmp_path / "run")
    spec["tune"] = [{"name": "student_tuned", "space": str(REPO / "search_spaces/loss_weights.yaml"), "samples": 2}]
    spec["register"]["student"] = "student_tuned"
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(spec))
    dag = build_dag(load_pipeline(path))
    tuned = dag.step("student_tuned")
    assert tuned.kind == "tune" and tuned.needs == ("data", "teacher")
    assert "student_tuned" in dag.step("evaluate").needs
    assert dag.names[-1] == "register"


@pytest.mark.parametrize("name", sorted(p.stem for p in PIPELINES.glob("*.yaml")))
def test_every_shipped_spec_gives_a_dag_in_dependency_order(name):
    dag = dag_of(name)
    position = {step: i for i, step in enumerate(dag.names)}
    for step in dag.steps:
        assert all(position[n] < position[step.name] for n in step.needs)
    assert dag.names[0] == "data" and len(set(dag.names)) == len(dag.names)
    assert sum(len(w) for w in dag.waves()) == len(dag.steps)
    assert f"pipeline {name}:" in format_dag(dag)


def test_plan_command_prints_the_steps_and_draws_them(tmp_path):
    png = tmp_path / "out" / "plan.png"
    result = runner.invoke(app, ["plan", str(PIPELINES / "quickstart.yaml"), "--png", str(png), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert [s["name"] for s in shown["steps"]] == [
        "data",
        "teacher",
        "student_baseline",
        "student_ssim",
        "evaluate",
        "register",
    ]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shown["png"] == str(png)
    text = runner.invoke(app, ["plan", str(PIPELINES / "progressive.yaml"), "--png", str(tmp_path / "p.png")])
    assert text.exit_code == 0, text.output
    assert "2. teacher_weak, teacher_strong, student_baseline" in text.output


def test_plan_of_a_broken_spec_names_the_file_and_the_model_and_draws_nothing(tmp_path):
    spec = yaml.safe_load((PIPELINES / "quickstart.yaml").read_text())
    spec["students"][1]["settings"]["distill"]["teachers"] = [{"source": "no_such_teacher"}]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(spec))
    png = tmp_path / "plan.png"
    result = runner.invoke(app, ["plan", str(path), "--png", str(png)])
    assert result.exit_code == 2
    assert str(path) in result.output and "student_ssim" in result.output and "no_such_teacher" in result.output
    assert not png.exists()


def toy_dag() -> PipelineDag:
    """data -> a, b (independent); c needs a; d needs b and c."""
    return PipelineDag(
        "toy",
        (
            Step("data", "data", (), ""),
            Step("a", "teacher", ("data",), "", "a"),
            Step("b", "teacher", ("data",), "", "b"),
            Step("c", "student", ("data", "a"), "", "c"),
            Step("d", "student", ("b", "c"), "", "d"),
        ),
    )


def test_independent_steps_run_at_the_same_time_up_to_the_limit():
    barrier = threading.Barrier(2, timeout=20)  # a and b each wait for the other: only possible side by side

    def run(step):
        if step.name in ("a", "b"):
            barrier.wait()
        return step.name.upper()

    done = execute(toy_dag(), run, steps=["a", "b", "c", "d"], parallel=2)
    assert done.ok and done.results == {"a": "A", "b": "B", "c": "C", "d": "D"}
    assert done.most_at_once == 2


def test_one_at_a_time_runs_in_spec_order_in_the_calling_thread():
    order, threads = [], set()

    def run(step):
        order.append(step.name)
        threads.add(threading.current_thread().name)

    done = execute(toy_dag(), run, steps=["a", "b", "c", "d"], parallel=1)
    assert done.ok and order == ["a", "b", "c", "d"] and done.most_at_once == 1
    assert threads == {threading.current_thread().name}


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_failed_step_stops_its_dependants_and_leaves_the_others(parallel):
    def run(step):
        if step.name == "a":
            raise RuntimeError("teacher a diverged")
        return step.name

    heard: dict[str, list[str]] = {}
    lock = threading.Lock()

    def on_change(step, state, error):
        with lock:
            heard.setdefault(step.name, []).append(state if error is None else f"{state}: {error}")

    done = execute(toy_dag(), run, steps=["a", "b", "c", "d"], parallel=parallel, on_change=on_change)
    assert not done.ok
    assert list(done.failed) == ["a"] and str(done.failed["a"]) == "teacher a diverged"
    assert done.blocked == ["c", "d"]  # c needs a; d needs c
    assert done.results == {"b": "b"}
    assert heard == {
        "a": ["running", "failed: teacher a diverged"],
        "b": ["running", "finished"],
        "c": ["blocked"],
        "d": ["blocked"],
    }


def test_a_step_that_does_not_fit_waits_for_room_and_a_lone_step_always_runs():
    running_now, peak = [0], [0]
    lock = threading.Lock()

    def run(step):
        with lock:
            running_now[0] += 1
            peak[0] = max(peak[0], running_now[0])
        threading.Event().wait(0.05)
        with lock:
            running_now[0] -= 1

    done = execute(toy_dag(), run, steps=["a", "b", "c", "d"], parallel=4, fits=lambda step, running: False)
    assert done.ok and peak[0] == 1 and done.most_at_once == 1


def test_steps_read_what_their_needs_returned():
    def run(step):
        return {"a": 1, "b": 2}.get(step.name, 0) + sum(results.get(n, 0) for n in step.needs)

    results: dict = {}
    done = execute(toy_dag(), run, steps=["a", "b", "c", "d"], parallel=2, results=results)
    assert results is done.results and results == {"a": 1, "b": 2, "c": 1, "d": 3}


def test_step_command_names_the_steps_and_asks_for_the_pipeline_run(tmp_path):
    sets = ["--set", f"workdir={tmp_path / 'w'}", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    unknown = runner.invoke(app, ["step", str(PIPELINES / "quickstart.yaml"), "nosuch", *sets])
    assert unknown.exit_code == 2
    assert "no step named 'nosuch'; the steps are data, teacher, student_baseline" in unknown.output
    orphan = runner.invoke(app, ["step", str(PIPELINES / "quickstart.yaml"), "teacher", *sets])
    assert orphan.exit_code == 2 and "--pipeline-run" in orphan.output
    assert not (tmp_path / "w").exists()  # refused before anything ran
