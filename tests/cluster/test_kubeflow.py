"""Kubeflow Pipelines: every shipped spec compiles to IR whose DAG is the spec's, inside an exit handler;
components/ matches the code; the compiled quickstart runs end to end with KFP's local runner and gives
``detkd run``'s summary rows (and ``detkd run`` after it registers nothing twice); a failed task ends the
pipeline's MLflow run FAILED, and the fixed rerun is linked to it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from factories import tiny_pipeline_spec, write_yaml
from typer.testing import CliRunner

from detkd.cli import app
from detkd.pipeline.dag import build_dag
from detkd.pipeline.load import load_pipeline

pytest.importorskip("kfp", reason="the kfp extra (.ci/run installs it)")
REPO = Path(__file__).resolve().parents[2]
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))
runner = CliRunner()


def read_ir(path: Path) -> dict[str, dict]:
    """Every task of a compiled pipeline, by display name: its upstream tasks (display names) and the
    conditions it runs under."""
    ir = yaml.safe_load(path.read_text())

    def walk(dag: dict, conditions: list[str], out: dict, names: dict) -> None:
        for key, task in dag["tasks"].items():
            names[key] = task["taskInfo"]["name"]
        for key, task in dag["tasks"].items():
            here = conditions + [task.get("triggerPolicy", {}).get("condition", "")]
            component = ir["components"][task["componentRef"]["name"]]
            if "dag" in component:  # a condition group: its tasks inherit its upstream tasks and condition
                inner: dict = {}
                walk(component["dag"], [c for c in here if c], inner, dict(names))
                for name, info in inner.items():
                    info["after"] |= {names[k] for k in task.get("dependentTasks", [])}
                    out[name] = info
            else:
                out[names[key]] = {
                    "after": {names[k] for k in task.get("dependentTasks", [])},
                    "conditions": [c for c in here if c],
                    "component": task["componentRef"]["name"],
                    "trigger": task.get("triggerPolicy", {}).get("strategy", ""),
                    "inputs": task.get("inputs", {}).get("parameters", {}),
                }

    tasks: dict = {}
    walk(ir["root"]["dag"], [], tasks, {})
    return tasks


@pytest.mark.parametrize("spec", PIPELINES, ids=lambda p: p.stem)
def test_every_shipped_spec_compiles_to_its_dag(spec, tmp_path):
    out = tmp_path / "pipeline.yaml"
    result = runner.invoke(app, ["compile", str(spec), "--out", str(out)])
    assert result.exit_code == 0, result.output
    dag = build_dag(load_pipeline(spec))
    tasks = read_ir(out)
    branches = {"register (speed gate)", "register (challenger)"}
    expected = set(dag.names) | (branches if "register" in dag.names else set()) | {"finish"}
    assert set(tasks) == expected
    # the exit handler: after every other task (the group "steps"), whatever happened, with the group's final
    # status, and KFP's run id, which the data task tags the pipeline's MLflow run with
    finish = tasks.pop("finish")
    assert finish["after"] == {"steps"} and finish["trigger"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finish["inputs"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    run_key = {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert finish["inputs"]["run_key"] == tasks["data"]["inputs"]["run_key"] == run_key
    for step in dag.steps:
        task = tasks[step.name]
        # every task after `data` (it opens the pipeline's MLflow run); otherwise exactly the step's needs
        assert task["after"] - {"data"} == set(step.needs) - {"data"}, step.name
        assert step.kind in task["component"] or (step.kind == "register" and "register" in task["component"])
        if step.kind == "register":
            assert task["after"] >= {"evaluate"} and task["conditions"] == [
                "inputs.parameter_values['pipelinechannel--evaluate-component-gate'] == 'pass'"
            ]
            # AP floors met, a speed floor left to the register step, which measures deployed speed and decides
            measured = tasks["register (speed gate)"]
            assert measured["conditions"][-1].endswith(
                "inputs.parameter_values['pipelinechannel--evaluate-component-gate'] == 'speed-at-registration'"
            ) and measured["conditions"][-1].startswith("!(")
            challenger = tasks["register (challenger)"]
            assert (
                challenger["conditions"][0].startswith("!(")
                and "evaluate-component-gate" in challenger["conditions"][0]
            )
        elif step.kind != "data":
            assert "data" in task["after"] and not task["conditions"]


def test_progressive_stages_compile_in_order_behind_their_teachers(tmp_path):
    out = tmp_path / "progressive.yaml"
    assert runner.invoke(app, ["compile", str(REPO / "pipelines/progressive.yaml"), "--out", str(out)]).exit_code == 0
    tasks = read_ir(out)
    assert tasks["student_progressive-stage1"]["after"] == {"data", "teacher_weak"}
    assert tasks["student_progressive"]["after"] == {"data", "student_progressive-stage1", "teacher_strong"}
    assert tasks["teacher_weak"]["after"] == tasks["teacher_strong"]["after"] == {"data"}  # in parallel


def test_components_folder_matches_the_code(tmp_path):
    from detkd.cluster.kubeflow import write_components

    fresh = {p.name: p.read_text() for p in write_components(tmp_path)}
    shipped = {p.name: p.read_text() for p in (REPO / "components").glob("*.yaml")}
    assert shipped == fresh, (
        "components/ drifted from src/detkd/cluster/kubeflow.py: python -m detkd.cluster.kubeflow components/"
    )
    teacher = yaml.safe_load(shipped["teacher.yaml"])
    spec = teacher["components"]["comp-teacher-step"]
    assert spec["inputDefinitions"]["artifacts"]["data"]["artifactType"]["schemaTitle"] == "system.Dataset"
    assert spec["outputDefinitions"]["artifacts"]["model"]["artifactType"]["schemaTitle"] == "system.Model"
    assert set(spec["outputDefinitions"]["parameters"]) == {"run_id", "val_ap"}
    executor = teacher["deploymentSpec"]["executors"]["exec-teacher-step"]["container"]
    assert executor["image"].startswith("detkd:") and "pip install" not in " ".join(executor["command"])


def test_compile_refuses_a_broken_spec_and_writes_nothing(tmp_path):
    spec = tmp_path / "broken.yaml"
    spec.write_text(
        "name: x\ndata: {synth: {images: 10}}\nstudents: [{name: s, settings: {model: {fpn_channels: 33}}}]\n"
    )
    out = tmp_path / "out.yaml"
    result = runner.invoke(app, ["compile", str(spec), "--out", str(out)])
    assert result.exit_code == 2 and str(spec) in result.output and not out.exists()


@pytest.mark.slow
@pytest.mark.ray
def test_compiled_quickstart_runs_with_kfp_local_like_detkd_run(quickstart_small, ray_cluster, tmp_path, monkeypatch):
    """The shrunken quickstart through `detkd run` (the session's run) and through KFP's SubprocessRunner
    (each task a `detkd step` process): the same summary rows, one MLflow pipeline run with the same children."""
    from kfp import local
    from mlflow.tracking import MlflowClient

    from detkd.cluster.kubeflow import build_pipeline

    spec_path = REPO / "pipelines/quickstart.yaml"
    uri_kfp = f"sqlite:///{tmp_path / 'kfp.db'}"
    kfp_args = [*quickstart_small.shrink, f"workdir={tmp_path / 'kfp'}", f"tracking.tracking_uri={uri_kfp}"]
    rows_run = quickstart_small.rows

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.get_runtime_context().gcs_address)  # the steps join this cluster
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))
    dag = build_dag(load_pipeline(spec_path, kfp_args))
    pipeline = build_pipeline(dag, spec=str(spec_path), overrides=kfp_args)
    pipeline()  # raises if a task fails
    rows_kfp = json.loads((tmp_path / "kfp" / "summary.json").read_text())

    def comparable(rows):
        return [{k: v for k, v in r.items() if k not in ("mlflow_run_id", "images_per_s", "registered")} for r in rows]

    assert comparable(rows_kfp) == comparable(rows_run)
    assert rows_kfp[-1]["registered"].startswith("detkd-quickstart-student v1 @")

    client = MlflowClient(uri_kfp)
    experiment = client.get_experiment_by_name("detkd-quickstart")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("detkd.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == {"data", "teacher", "student_baseline", "student_ssim", "evaluate", "register"}
    assert os.path.isfile(tmp_path / "kfp" / "lineage.png")

    # the same pipeline again, now with `detkd run`: every model is reused, and the student is not registered twice
    args = ["run", str(spec_path)] + [item for value in kfp_args for item in ("--set", value)]
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "is already version 1 of detkd-quickstart-student" in again.output and "nothing registered" in again.output
    assert [str(v.version) for v in client.search_model_versions("name = 'detkd-quickstart-student'")] == ["1"]
    first, second = client.search_runs(
        [experiment.experiment_id], "tags.`detkd.kind` = 'pipeline'", order_by=["attributes.start_time"]
    )
    assert second.info.status == "FINISHED" and "detkd.rerun_of" not in second.data.tags  # the first one finished
    rerun = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{second.info.run_id}'")
    assert {r.info.run_name for r in rerun} == {"data", "evaluate", "register"}  # nothing trained again
    register = client.search_runs([experiment.experiment_id], "attributes.run_name = 'register'")
    assert sorted(r.data.tags["detkd.already_registered"] for r in register) == ["false", "true"]


@pytest.mark.slow
@pytest.mark.ray
def test_a_failed_task_fails_the_pipeline_run_and_a_fixed_rerun_links_to_it(ray_cluster, tmp_path, monkeypatch):
    """KFP's SubprocessRunner runs the exit handler after a task failed: a teacher whose class count the data
    does not have (an override the tasks get; the data exist only once the data task ran) fails, and the
    pipeline's MLflow run ends FAILED. The pipeline compiled again without it runs to the end: a new parent run,
    FINISHED, tagged ``detkd.rerun_of`` the failed one."""
    from kfp import local
    from mlflow.tracking import MlflowClient

    from detkd.cluster.kubeflow import build_pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_pipeline_spec(
        "kfp_exit", tmp_path / "work", uri, teachers=[{"name": "teacher", "settings": {}}],
        synth={"images": 24, "test_images": 6},
    )  # fmt: skip
    spec_path = write_yaml(tmp_path / "kfp_exit.yaml", spec)
    bad = ["teachers.teacher.settings.model.num_classes=7", "teachers.teacher.settings.run.max_failures=0"]
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.get_runtime_context().gcs_address)  # the steps join this cluster
    monkeypatch.chdir(tmp_path)

    def run_pipeline(overrides: list[str], *, raise_on_error: bool) -> None:
        local.init(
            runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"),
            raise_on_error=raise_on_error,
        )  # fmt: skip
        dag = build_dag(load_pipeline(spec_path, overrides))
        build_pipeline(dag, spec=str(spec_path), overrides=overrides)()

    def parents() -> list:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("kfp_exit")
        return client.search_runs(
            [experiment.experiment_id], "tags.`detkd.kind` = 'pipeline'", order_by=["attributes.start_time"]
        )

    run_pipeline(bad, raise_on_error=False)
    (failed,) = parents()
    assert failed.info.status == "FAILED"  # not RUNNING forever
    assert failed.data.tags["detkd.run_key"] and "FAILED" in failed.data.tags["detkd.error"]
    children = MlflowClient(uri).search_runs(
        [failed.info.experiment_id], f"tags.`mlflow.parentRunId` = '{failed.info.run_id}'"
    )
    assert {r.info.run_name for r in children} >= {"data"} and all(r.info.status != "RUNNING" for r in children)
    assert not (tmp_path / "work" / "models" / "teacher" / "model.pt").exists()

    run_pipeline([], raise_on_error=True)  # fixed: raises if a task fails
    first, rerun = parents()
    assert first.info.run_id == failed.info.run_id and first.info.status == "FAILED"
    assert rerun.info.status == "FINISHED" and rerun.data.tags["detkd.rerun_of"] == failed.info.run_id
    assert rerun.data.tags["detkd.run_key"] != failed.data.tags["detkd.run_key"]  # one key per KFP run
    assert (tmp_path / "work" / "models" / "teacher" / "model.pt").is_file()
