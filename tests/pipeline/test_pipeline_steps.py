"""Pipeline steps on a local Ray cluster: teachers side by side, the same lineage as one at a time,
finished steps reused on a rerun, and a failed step that stops only what needs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import tiny_pipeline_spec, write_yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from detkd.cli import app
from detkd.pipeline.load import load_pipeline
from detkd.pipeline.runner import run_pipeline

EXPERIMENT = "detkd-steps"


def tiny_spec(tmp_path: Path, name: str, *, uri: str, teachers: list[dict], students: list[dict]) -> Path:
    spec = tiny_pipeline_spec(
        name,
        tmp_path / name,
        uri,
        experiment=EXPERIMENT,
        synth={"images": 40, "test_images": 12},
        teachers=teachers,
        students=students,
    )
    return write_yaml(tmp_path / f"{name}.yaml", spec)


HALF = {"input": {"scale": 0.5}, "model": {"min_level": 2, "max_level": 6}}
TWO_TEACHERS = [{"name": "t_a", "settings": {"seed": 0}}, {"name": "t_b", "settings": {"seed": 1}}]
STUDENTS = [
    {"name": "s_base", "settings": HALF},
    {"name": "s_kd", "settings": {**HALF, "distill": {"teachers": [{"source": "t_a"}], "ssim": {}}}},
]


def model_runs(uri: str, parent_id: str) -> dict[str, object]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`detkd.pipeline_run` = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


def lineage_by_name(uri: str, parent_id: str) -> dict[str, dict[str, str]]:
    """Each child run's lineage with run ids replaced by run names (comparable across pipelines)."""
    runs = model_runs(uri, parent_id)
    name_of = {r.info.run_id: name for name, r in runs.items()}
    out = {}
    for name, run in runs.items():
        tags = run.data.tags
        out[name] = {
            "component": tags.get("detkd.component"),
            "teachers": [name_of.get(t, t) for t in json.loads(tags.get("detkd.teacher_runs", "[]"))],
            "datasets": {k: v for k, v in tags.items() if k.startswith("detkd.dataset.")},
            "has_config_digest": bool(tags.get("detkd.config_digest")),  # digests cover data paths: per workdir
        }
    return out


def parent_of(uri: str, workdir_name: str) -> list[str]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`detkd.kind` = 'pipeline'", order_by=["attributes.start_time"]
    )
    return [r.info.run_id for r in runs if r.data.tags.get("detkd.pipeline") == workdir_name]


@pytest.mark.slow
@pytest.mark.ray
def test_teachers_train_side_by_side_with_the_lineage_of_one_at_a_time_and_reruns_reuse_them(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sequential = tiny_spec(tmp_path, "sequential", uri=uri, teachers=TWO_TEACHERS, students=STUDENTS)
    concurrent = tiny_spec(tmp_path, "concurrent", uri=uri, teachers=TWO_TEACHERS, students=STUDENTS)

    rows_seq = run_pipeline(load_pipeline(sequential))
    rows_par = run_pipeline(load_pipeline(concurrent), parallel=2)
    assert [r.name for r in rows_par] == [r.name for r in rows_seq] == ["t_a", "t_b", "s_base", "s_kd"]

    (seq_parent,) = parent_of(uri, "sequential")
    (par_parent,) = parent_of(uri, "concurrent")
    runs = model_runs(uri, par_parent)
    a, b = runs["t_a"].info, runs["t_b"].info
    assert a.start_time < b.end_time and b.start_time < a.end_time  # the two teachers overlapped in time
    seq_runs = model_runs(uri, seq_parent)
    assert seq_runs["t_a"].info.end_time <= seq_runs["t_b"].info.start_time  # one at a time by default
    # the same lineage either way: components, teachers by run, dataset digests
    assert lineage_by_name(uri, par_parent) == lineage_by_name(uri, seq_parent)
    assert runs["s_kd"].data.tags["detkd.teacher.0"] == a.run_id

    # a rerun trains nothing again: every model step is reused (no new MLflow run) and scores the same
    rerun = run_pipeline(load_pipeline(concurrent), parallel=2)
    assert [(r.name, r.mlflow_run_id, r.AP) for r in rerun] == [(r.name, r.mlflow_run_id, r.AP) for r in rows_par]
    first, second = parent_of(uri, "concurrent")
    assert second != first and set(model_runs(uri, second)) == {"data", "evaluate"}  # nothing trained again


@pytest.mark.slow
@pytest.mark.ray
def test_a_failed_step_stops_what_needs_it_and_keeps_the_rest(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a valid spec whose step fails: the class count is checked against the data, which exists once the data step ran
    teachers = [
        {"name": "t_a", "settings": {}},
        {"name": "t_bad", "settings": {"model": {"num_classes": 7}, "run": {"max_failures": 0}}},
    ]
    students = [
        {"name": "s_base", "settings": HALF},
        {"name": "s_bad", "settings": {**HALF, "distill": {"teachers": [{"source": "t_bad"}], "ssim": {}}}},
    ]
    spec = tiny_spec(tmp_path, "failing", uri=uri, teachers=teachers, students=students)
    result = CliRunner().invoke(app, ["run", str(spec), "--parallel", "2"])
    assert result.exit_code == 1, result.output
    assert "step t_bad failed" in result.output
    assert "not run, they need a failed step: s_bad" in result.output
    assert "finished and kept: t_a, s_base" in result.output or "finished and kept: s_base, t_a" in result.output
    models = tmp_path / "failing" / "models"
    assert (models / "t_a" / "model.pt").is_file() and (models / "s_base" / "model.pt").is_file()
    assert not (models / "t_bad").exists() or not (models / "t_bad" / "model.pt").exists()
    assert not (models / "s_bad").exists()
    (parent,) = parent_of(uri, "failing")
    parent_tags = MlflowClient(uri).get_run(parent).data.tags
    assert json.loads(parent_tags["detkd.failed_steps"]) == ["t_bad"]
    assert json.loads(parent_tags["detkd.blocked_steps"]) == ["s_bad"]
    assert MlflowClient(uri).get_run(parent).info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.ray
def test_progressive_stages_are_steps_that_follow_their_teachers(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stages = [{"teacher": {"source": "t_a"}}, {"teacher": {"source": "t_b"}}]
    students = [{"name": "s_prog", "settings": {**HALF, "distill": {"ssim": {}, "stages": stages}}}]
    spec = tiny_spec(tmp_path, "progressive", uri=uri, teachers=TWO_TEACHERS, students=students)
    rows = run_pipeline(load_pipeline(spec), parallel=2)
    assert [r.name for r in rows] == ["t_a", "t_b", "s_prog"]
    (parent,) = parent_of(uri, "progressive")
    runs = model_runs(uri, parent)
    first, last = runs["s_prog-stage1"], runs["s_prog-stage2"]
    assert first.data.tags["detkd.teacher.0"] == runs["t_a"].info.run_id
    assert last.data.tags["detkd.teacher.0"] == runs["t_b"].info.run_id
    assert last.data.tags["detkd.previous_stage_run"] == first.info.run_id
    assert first.info.end_time <= last.info.start_time  # stages in order
    assert rows[2].mlflow_run_id == last.info.run_id and rows[2].method == "progressive"
    assert (tmp_path / "progressive" / "models" / "s_prog" / "model.pt").is_file()
