"""The tracking outbox: order, the memory bound and the file, replay progress, against a real SQLite
MLflow store and a URI where nothing listens (no server, no Ray)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from detkd.cli import app
from detkd.tracking.buffered import BufferedLogger
from detkd.tracking.delivery import TrackingNotDelivered, replay, unreachable
from detkd.tracking.outbox import OUTBOX_DIR, PROGRESS, RECORDS, Outbox, OutboxError, Record, describe
from detkd.tracking.runs import start_run


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (making one takes seconds); each test logs into a run of its own."""
    return f"sqlite:///{tmp_path_factory.mktemp('outbox-store') / 'mlflow.db'}"


@pytest.fixture()
def mlflow_uri(store) -> str:
    return store


@pytest.fixture()
def run_id(mlflow_uri) -> str:
    return start_run(tracking_uri=mlflow_uri, experiment="outbox", run_name="r")


@pytest.fixture()
def fail_fast(monkeypatch):
    """No MLflow HTTP retries in this test process (the first delivery to a dead URI fails at once)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def steps(uri: str, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def kept(uri: str, run_id: str, folder, *, memory_limit: int = 3, n: int = 10) -> BufferedLogger:
    """A logger that logged steps 1..n of ``loss``, a tag and a text file to ``uri``, then the run's end."""
    logger = BufferedLogger(tracking_uri=uri, run_id=run_id, folder=folder, memory_limit=memory_limit)
    for step in range(1, n + 1):
        logger.metrics({"loss": 1.0 / step}, step=step)
    logger.tags({"note": "kept"})
    logger.text("hello", "notes/hello.txt")
    logger.end("FINISHED")
    return logger


def test_records_arrive_in_the_order_logged(mlflow_uri, run_id, tmp_path):
    report = kept(mlflow_uri, run_id, tmp_path / OUTBOX_DIR).close(timeout=5)
    assert report.ok and report.count == 0
    assert steps(mlflow_uri, run_id) == [(s, 1.0 / s) for s in range(1, 11)]
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["detkd.note"] == "kept"
    assert MlflowClient(mlflow_uri).download_artifacts(run_id, "notes/hello.txt", str(tmp_path / "dl"))
    assert not (tmp_path / OUTBOX_DIR).exists()  # nothing was kept: no folder


def test_a_server_that_does_not_answer_leaves_everything_in_order_in_the_file_then_replays(
    mlflow_uri, run_id, dead_server_uri, tmp_path, fail_fast
):
    folder = tmp_path / "run" / OUTBOX_DIR
    logger = kept(dead_server_uri, run_id, folder)
    assert len((folder / RECORDS).read_text().splitlines()) >= 8  # past the bound of 3: memory moved to the file
    report = logger.close(timeout=1)
    assert report.count == 13 and not report.refused
    message = report.message(tmp_path / "run")
    assert message.startswith(f"tracking server {dead_server_uri} unreachable since ")
    assert f"10 metric values, 1 tag, 1 artifact and the run's end (FINISHED) not delivered to run {run_id}" in message
    assert message.endswith(f"deliver them with: detkd tracking replay {tmp_path / 'run'}")
    lines = [json.loads(line) for line in (folder / RECORDS).read_text().splitlines()]
    assert [line["data"]["metrics"][0][3] for line in lines[:10]] == list(range(1, 11))  # steps, oldest first
    assert [line["kind"] for line in lines[10:]] == ["tags", "text", "end"]

    done = replay(tmp_path / "run", tracking_uri=mlflow_uri)  # the same run, in the store the test reads
    assert done.delivered == "10 metric values, 1 tag, 1 artifact and the run's end (FINISHED)"
    assert steps(mlflow_uri, run_id) == [(s, 1.0 / s) for s in range(1, 11)]
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"
    assert not folder.exists()


def test_artifacts_are_copied_into_the_outbox_so_it_replays_on_its_own(
    mlflow_uri, run_id, dead_server_uri, tmp_path, fail_fast
):
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    logger = BufferedLogger(tracking_uri=dead_server_uri, run_id=run_id, folder=tmp_path / "run" / OUTBOX_DIR)
    logger.artifact(model, "checkpoint")
    logger.close(timeout=1)
    model.unlink()  # a later run replaced the published file: the outbox has its own copy
    replay(tmp_path / "run", tracking_uri=mlflow_uri)
    local = MlflowClient(mlflow_uri).download_artifacts(run_id, "checkpoint/model.pt", str(tmp_path / "dl"))
    assert open(local, "rb").read() == b"weights"


def test_an_interrupted_replay_continues_where_it_stopped_and_never_logs_a_point_twice(
    mlflow_uri, run_id, dead_server_uri, tmp_path, fail_fast
):
    folder = tmp_path / "run" / OUTBOX_DIR
    kept(dead_server_uri, run_id, folder, memory_limit=1).close(timeout=1)
    # a replay stopped after 4 records: they reached the store and the folder counts them
    first = Outbox(folder, tracking_uri=mlflow_uri).records()[:4]
    for record in first:
        MlflowClient(mlflow_uri).log_metric(run_id, "loss", *record.data["metrics"][0][1:])
    Outbox(folder, tracking_uri=mlflow_uri).done(4)
    assert json.loads((folder / PROGRESS).read_text())["lines"] == 4
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)

    done = replay(tmp_path / "run", tracking_uri=mlflow_uri)
    assert done.delivered.startswith("6 metric values, ")
    assert steps(mlflow_uri, run_id) == [(s, 1.0 / s) for s in range(1, 11)]
    # stopped after its deliveries but before counting them: the same records again change nothing
    shutil.copytree(backup, folder)
    replay(tmp_path / "run", tracking_uri=mlflow_uri)
    assert steps(mlflow_uri, run_id) == [(s, 1.0 / s) for s in range(1, 11)]


def test_replay_to_a_server_still_down_keeps_the_outbox_and_exits_1(run_id, dead_server_uri, tmp_path, fail_fast):
    folder = tmp_path / "run" / OUTBOX_DIR
    kept(dead_server_uri, run_id, folder).close(timeout=1)
    before = (folder / RECORDS).read_text()
    with pytest.raises(TrackingNotDelivered, match="still kept in"):
        replay(tmp_path / "run")  # the recorded URI: still nothing listens there
    assert (folder / RECORDS).read_text() == before and not (folder / PROGRESS).exists()

    result = CliRunner().invoke(app, ["tracking", "replay", str(tmp_path / "run")])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"tracking server {dead_server_uri} unreachable" in errors[0]
    assert "Traceback" not in result.output


def test_replay_through_the_cli_says_what_it_delivered(mlflow_uri, run_id, dead_server_uri, tmp_path, fail_fast):
    kept(dead_server_uri, run_id, tmp_path / "run" / OUTBOX_DIR).close(timeout=1)
    result = CliRunner().invoke(app, ["tracking", "replay", str(tmp_path / "run"), "--tracking-uri", mlflow_uri])
    assert result.exit_code == 0, result.output
    assert f"delivered 10 metric values, 1 tag, 1 artifact and the run's end (FINISHED) to run {run_id}" in (
        result.output.replace("\n", " ")
    )
    assert steps(mlflow_uri, run_id) == [(s, 1.0 / s) for s in range(1, 11)]


def test_a_refused_record_is_reported_not_kept(mlflow_uri, run_id, tmp_path):
    logger = BufferedLogger(tracking_uri=mlflow_uri, run_id=run_id, folder=tmp_path / OUTBOX_DIR)
    logger.params({"lr": 0.1})
    logger.metrics({"loss": 1.0}, step=1)
    logger.params({"lr": 0.2})  # MLflow refuses to change a logged param: retrying cannot help
    logger.metrics({"loss": 0.5}, step=2)
    report = logger.close(timeout=5)
    assert report.count == 0 and len(report.refused) == 1
    assert report.refused[0].startswith(f"1 param of run {run_id}: ")
    assert "refused 1 param" in report.message(tmp_path) and "not retried" in report.message(tmp_path)
    assert steps(mlflow_uri, run_id) == [(1, 1.0), (2, 0.5)]  # what came after still arrived
    assert not (tmp_path / OUTBOX_DIR).exists()


def test_a_worker_carries_what_it_kept_into_its_checkpoint_for_the_driver(
    mlflow_uri, run_id, dead_server_uri, tmp_path, fail_fast
):
    worker = BufferedLogger(tracking_uri=dead_server_uri, run_id=run_id, folder=tmp_path / "node-tmp", memory_limit=2)
    for step in range(1, 6):
        worker.metrics({"loss": 1.0 / step}, step=step)
    checkpoint = tmp_path / "checkpoint_000001"
    assert worker.carry(checkpoint, timeout=1) == 5
    assert not (tmp_path / "node-tmp").exists()  # handed on, nothing left on the worker's node

    driver = BufferedLogger(tracking_uri=mlflow_uri, run_id=run_id, folder=tmp_path / "run" / OUTBOX_DIR)
    driver.metrics({"loss": 0.0}, step=0)
    assert driver.merge(checkpoint) == 5
    driver.end("FINISHED")
    report = driver.close(timeout=5)
    assert report.ok
    assert sorted(steps(mlflow_uri, run_id)) == [(0, 0.0)] + [(s, 1.0 / s) for s in range(1, 6)]
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"


def test_unreachable_tells_a_dead_server_from_a_refusal(mlflow_uri, run_id, dead_server_uri, fail_fast):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as dead:
        MlflowClient(dead_server_uri).log_metric(run_id, "x", 1.0)
    assert unreachable(dead.value, dead_server_uri)
    with pytest.raises(MlflowException) as refused:
        MlflowClient(mlflow_uri).get_run("no-such-run")
    assert not unreachable(refused.value, "http://127.0.0.1:1")  # RESOURCE_DOES_NOT_EXIST: an answer
    assert not unreachable(dead.value, mlflow_uri)  # a local store is never "unreachable"


def test_describe_counts_what_a_reader_cares_about():
    records = [
        Record("metrics", "r", {"metrics": [["a", 1.0, 0, 1], ["b", 2.0, 0, 1]]}),
        Record("params", "r", {"params": [["p", "1"]]}),
        Record("dict", "r", {"data": {}, "name": "plan.json"}),
        Record("end", "r", {"status": "FAILED"}),
    ]
    assert describe(records) == "2 metric values, 1 param, 1 artifact and the run's end (FAILED)"
    assert describe([]) == "nothing"


def test_replay_of_a_folder_without_an_outbox_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["tracking", "replay", str(tmp_path)])
    assert result.exit_code == 2
    assert f"error: {tmp_path / OUTBOX_DIR / RECORDS}: no tracking outbox here" in result.output.replace("\n", "")


def test_replay_names_the_line_that_is_not_a_record(run_id, dead_server_uri, tmp_path, fail_fast):
    folder = tmp_path / "run" / OUTBOX_DIR
    kept(dead_server_uri, run_id, folder).close(timeout=1)
    lines = (folder / RECORDS).read_text().splitlines(keepends=True)
    lines[2] = '{"kind": "metrics", "run_id": \n'
    (folder / RECORDS).write_text("".join(lines))
    with pytest.raises(OutboxError, match=re.escape(f"{folder / RECORDS}:3: ")):
        replay(tmp_path / "run")
    result = CliRunner().invoke(app, ["tracking", "replay", str(tmp_path / "run")])
    assert result.exit_code == 2 and f"{RECORDS}:3:" in result.output.replace("\n", "")
    assert "Traceback" not in result.output
