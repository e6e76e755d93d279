"""Credentials never reach MLflow: URI passwords and secret query values are masked in params, tags and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from detkd.tracking.redact import has_credentials, redact, redact_value
from detkd.tracking.runs import RunLogger, run_context


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:s3cret@mlflow:5000", "http://alice:***@mlflow:5000"),
        ("postgresql://mlflow:p%40ss@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("s3://bucket/x?access_key=AKIA1&secret_key=abc/def", "s3://bucket/x?access_key=***&secret_key=***"),
        ("https://h/x?sig=zz&other=1", "https://h/x?sig=***&other=1"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),  # nothing secret: unchanged
        ("http://alice@mlflow:5000", "http://alice@mlflow:5000"),  # a user alone is not a secret
        ("see http://a:b@h1 and http://c:d@h2", "see http://a:***@h1 and http://c:***@h2"),
    ],
)
def test_redact_masks_passwords_and_secret_parameters(text, expected):
    assert redact(text) == expected
    assert has_credentials(text) == (text != expected)


def test_redact_value_walks_nested_configs():
    data = {"tracking": {"tracking_uri": "http://u:pw@h"}, "teachers": ["s3://b?token=t", 3], "n": 1}
    assert redact_value(data) == {
        "tracking": {"tracking_uri": "http://u:***@h"},
        "teachers": ["s3://b?token=***", 3],
        "n": 1,
    }


def test_params_tags_and_json_logged_to_mlflow_hold_no_password(mlflow_uri):
    secret_uri = "http://bob:hunter2@tracking.example:5000"
    with run_context(tracking_uri=mlflow_uri, experiment="redact", run_name="r", tags={"source": secret_uri}) as run_id:
        logger = RunLogger(tracking_uri=mlflow_uri, run_id=run_id)
        logger.params(
            {"tracking": {"tracking_uri": secret_uri}, "run": {"storage_path": "s3://b/x?secret_key=hunter2"}}
        )
        logger.tags({"endpoint": secret_uri})
        logger.dict({"plan": {"tracking": {"uri": secret_uri}}}, "plan.json")
        logger.text(f"tracking at {secret_uri}\n", "notes.txt")
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    logged = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert "hunter2" not in logged
    assert run.data.params["tracking.tracking_uri"] == "http://bob:***@tracking.example:5000"
    assert run.data.tags["detkd.endpoint"] == "http://bob:***@tracking.example:5000"
    folder = client.download_artifacts(run_id, "")
    for name in ("plan.json", "notes.txt"):
        text = (Path(folder) / name).read_text()
        assert "hunter2" not in text and "bob:***@" in text
