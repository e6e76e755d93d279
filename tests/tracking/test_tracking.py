"""Tracking store checks and experiment tags, against SQLite and a real ``mlflow server``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from detkd.tracking.runs import (
    EXPERIMENT_KIND,
    TrackingUnreachable,
    check_tracking_uri,
    experiment_id,
    resolve_tracking_uri,
)


def test_unreachable_server_is_refused_naming_the_uri(dead_server_uri):
    with pytest.raises(TrackingUnreachable, match=f"{dead_server_uri} is unreachable"):
        check_tracking_uri(dead_server_uri)


def test_sqlite_store_in_a_missing_folder_is_refused(tmp_path):
    uri = f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}"
    with pytest.raises(TrackingUnreachable, match="does not exist"):
        check_tracking_uri(uri)


@pytest.mark.server
def test_real_server_passes_and_gets_tagged_experiments(mlflow_server):
    check_tracking_uri(mlflow_server.uri)
    exp_id = experiment_id(mlflow_server.uri, "tagged")
    tags = MlflowClient(mlflow_server.uri).get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_experiments_made_before_the_tag_get_it(mlflow_uri):
    client = MlflowClient(mlflow_uri)
    exp_id = client.create_experiment("old")
    assert "mlflow.experimentKind" not in client.get_experiment(exp_id).tags
    assert experiment_id(mlflow_uri, "old") == exp_id
    tags = client.get_experiment(exp_id).tags
    assert {k: tags[k] for k in EXPERIMENT_KIND} == EXPERIMENT_KIND


def test_a_relative_sqlite_store_keeps_artifacts_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/x").mkdir(parents=True)
    uri = "sqlite:///runs/x/mlflow.db"  # relative to the current folder
    check_tracking_uri(uri)
    found = MlflowClient(uri).get_experiment(experiment_id(uri, "rel"))
    assert found.artifact_location == (tmp_path / "runs/x/mlartifacts").as_uri()
    # Ray workers run elsewhere: the driver hands them the absolute store, from the spec or the environment
    assert resolve_tracking_uri(uri) == f"sqlite:///{tmp_path / 'runs/x/mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'runs/x/mlflow.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_train_with_an_unreachable_server_fails_before_ray_starts(tiny_dataset, tiny_config, dead_server_uri, tmp_path):
    """What a new user meets with a wrong MLFLOW_TRACKING_URI: one error line, no Ray, no run folder."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_dataset, tmp_path)))
    uri = dead_server_uri
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ""}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("detkd")), "train", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{uri} is unreachable" in output
    assert "Traceback" not in output
    assert "Ray" not in output  # no local Ray instance was started
    assert not (tmp_path / "ray").exists()
