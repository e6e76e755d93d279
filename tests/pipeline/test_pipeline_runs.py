"""A pipeline's parent MLflow run: a rerun after a failed run is linked to it, and an exit handler (Kubeflow's
``finish`` task) finds the run by the orchestrator's run id and ends it. Real SQLite store, no training."""

from __future__ import annotations

from factories import tiny_pipeline_spec, write_yaml
from mlflow.tracking import MlflowClient

from detkd.pipeline.load import load_pipeline
from detkd.pipeline.runner import end_pipeline_run, end_pipeline_run_by_key, open_pipeline_run
from detkd.tracking.runs import run_context


def spec_of(tmp_path, name="linked", overrides=()):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_pipeline_spec(name, tmp_path / name, uri, teachers=[{"name": "t", "settings": {}}])
    return load_pipeline(write_yaml(tmp_path / f"{name}.yaml", spec), list(overrides)), uri


def test_a_rerun_after_a_failed_run_is_linked_to_it(tmp_path):
    spec, uri = spec_of(tmp_path)
    client = MlflowClient(uri)
    first = open_pipeline_run(spec)
    assert "detkd.rerun_of" not in client.get_run(first).data.tags
    end_pipeline_run(spec, first, "FAILED")

    # fixed by a changed setting: the same pipeline (name and workdir), other settings
    fixed, _ = spec_of(tmp_path, overrides=["defaults.train.epochs=2"])
    second = open_pipeline_run(fixed)
    tags = client.get_run(second).data.tags
    assert tags["detkd.rerun_of"] == first
    assert tags["detkd.pipeline_key"] == client.get_run(first).data.tags["detkd.pipeline_key"]
    assert tags["detkd.spec_digest"] != client.get_run(first).data.tags["detkd.spec_digest"]
    end_pipeline_run(fixed, second, "FINISHED")

    third = open_pipeline_run(fixed)  # after a finished run, a run is no rerun of anything
    assert "detkd.rerun_of" not in client.get_run(third).data.tags
    end_pipeline_run(fixed, third, "KILLED")  # Ctrl-C
    assert client.get_run(open_pipeline_run(fixed)).data.tags["detkd.rerun_of"] == third

    other, _ = spec_of(tmp_path, name="other")  # another pipeline in the same store is not linked
    assert "detkd.rerun_of" not in client.get_run(open_pipeline_run(other)).data.tags


def test_the_exit_handler_ends_the_run_it_is_keyed_to(tmp_path):
    spec, uri = spec_of(tmp_path)
    client = MlflowClient(uri)
    assert end_pipeline_run_by_key(spec, "kfp-0", status="FAILED") is None  # the data task failed before opening it

    parent = open_pipeline_run(spec, run_key="kfp-1")
    unrelated = open_pipeline_run(spec, run_key="kfp-2")
    with run_context(tracking_uri=uri, experiment="linked", run_name="t", parent_run_id=parent) as done_child:
        pass
    hung = client.create_run(client.get_run(parent).info.experiment_id, tags={"mlflow.parentRunId": parent})
    assert end_pipeline_run_by_key(spec, "kfp-1", status="FAILED", error="t: FAILED 1 task t failed") == parent
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["detkd.error"] == "t: FAILED 1 task t failed"
    assert client.get_run(hung.info.run_id).info.status == "FAILED"  # a step whose process died with its run open
    assert client.get_run(done_child).info.status == "FINISHED"
    assert client.get_run(unrelated).info.status == "RUNNING"

    # every task succeeded: the last step closed the run; the exit handler leaves it FINISHED
    end_pipeline_run(spec, unrelated, "FINISHED")
    assert end_pipeline_run_by_key(spec, "kfp-2", status="FINISHED") == unrelated
    assert client.get_run(unrelated).info.status == "FINISHED"
    rerun = open_pipeline_run(spec, run_key="kfp-3")
    assert "detkd.rerun_of" not in client.get_run(rerun).data.tags  # the newest run before it finished
