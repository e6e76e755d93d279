"""Storage on real servers at 127.0.0.1: Ray Train checkpoints and resume on an S3-compatible server, and an
MLflow tracking server on PostgreSQL whose artifacts live in that S3 store (the setup of infra/mlflow.yaml)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from servers import free_port, postgres_server, s3_server, serving

from detkd.config import Config
from detkd.tracking.runs import RunLogger, run_context


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3"), buckets=("detkd-checkpoints", "detkd-mlflow")) as server:
        yield server


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.ray
def test_checkpoints_and_resume_on_an_s3_server(tiny_dataset, tiny_config, ray_cluster, tmp_path, tracking, s3):
    from detkd.engine.launch import run_training

    data = tiny_config(
        tiny_dataset,
        tmp_path,
        train={"epochs": 2, "log_every": 1, "checkpoint_every_steps": 2},
        run={"max_failures": 2, "storage_path": "s3://detkd-checkpoints/runs", "storage_endpoint": s3.endpoint},
        debug={"fail_at_step": 5},
        tracking={"log_model": False},
    )
    cfg = Config.model_validate(data)
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)  # the driver's keys travel to the workers inside the storage filesystem
    try:
        outcome = run_training(cfg, tracking=tracking)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert (tmp_path / "models/tiny/.fault-injected").read_text() == "5"  # a worker was lost after step 5
    assert outcome.metrics["step"] == 8  # and restarted from a checkpoint read back from S3
    keys = s3.keys("detkd-checkpoints", "runs/")
    checkpoints = {part for k in keys for part in k.split("/") if part.startswith("checkpoint_")}
    assert checkpoints, keys[:20]
    assert all(k.startswith("runs/tiny-") for k in keys if k != "runs/"), keys[:20]  # one run folder, this one
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").rglob("checkpoint_*"))  # nothing local
    history = MlflowClient(tracking.uri).get_metric_history(outcome.run_id, "train/loss")
    steps = [m.step for m in history]
    assert sorted(set(steps)) == list(range(1, 9)) and len(steps) - len(set(steps)) <= 2


@pytest.mark.server
def test_mlflow_server_on_postgres_with_artifacts_on_s3(s3, tmp_path):
    import psycopg

    with postgres_server() as pg:
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--workers", "1", "--serve-artifacts", "--artifacts-destination", "s3://detkd-mlflow/artifacts"]
        # the backend URI (with its password) comes from the environment, as in infra/mlflow.yaml
        env = {**os.environ, **s3.env, "MLFLOW_BACKEND_STORE_URI": pg.uri}
        with serving(command, ready_url=f"{uri}/health", log_path=tmp_path / "mlflow.log", env=env, wait_s=180):
            storage = f"s3://detkd-checkpoints/x?secret_key={pg.password}"
            with run_context(tracking_uri=uri, experiment="detkd-storage", run_name="r", tags={"k": "v"}) as run_id:
                logger = RunLogger(tracking_uri=uri, run_id=run_id)
                logger.params({"run": {"storage_path": storage}, "tracking": {"tracking_uri": pg.uri}})
                logger.metrics({"val/AP": 0.5}, step=1)
                (tmp_path / "model.txt").write_text("weights")
                logger.artifact(tmp_path / "model.txt", "checkpoint")
                logger.dict({"plan": {"storage": storage}}, "plan.json")
            client = MlflowClient(uri)
            version = client.create_model_version(
                client.create_registered_model("detkd-storage-model").name, f"runs:/{run_id}/checkpoint", run_id
            )
            client.set_registered_model_alias("detkd-storage-model", "champion", version.version)
            fetched = Path(client.download_artifacts(run_id, "checkpoint/model.txt", str(tmp_path / "back")))
            assert fetched.read_text() == "weights"
            assert client.get_model_version_by_alias("detkd-storage-model", "champion").version == version.version

        # the artifacts went to the S3 server, the runs and the registry to PostgreSQL, and no password to either
        keys = s3.keys("detkd-mlflow", "artifacts/")
        assert any(k.endswith(f"{run_id}/artifacts/checkpoint/model.txt") for k in keys), keys
        plan = s3.client().get_object(Bucket="detkd-mlflow", Key=next(k for k in keys if k.endswith("plan.json")))
        assert pg.password not in plan["Body"].read().decode()
        with psycopg.connect(pg.uri) as connection, connection.cursor() as cursor:
            cursor.execute("select status from runs where run_uuid = %s", (run_id,))
            assert cursor.fetchone() == ("FINISHED",)
            cursor.execute("select key, value from params where run_uuid = %s", (run_id,))
            params = dict(cursor.fetchall())
            cursor.execute("select name from registered_models")
            assert ("detkd-storage-model",) in cursor.fetchall()
        assert params["run.storage_path"] == "s3://detkd-checkpoints/x?secret_key=***"
        assert pg.password not in json.dumps(params) and "detkd:***@127.0.0.1" in params["tracking.tracking_uri"]
