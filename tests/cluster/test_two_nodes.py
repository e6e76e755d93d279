"""Two Ray nodes on this machine (a head with no CPUs, a worker node joined with ``ray start --address``),
checkpoints on an S3-compatible server: a lost worker node, and a sweep whose driver is killed mid-sweep.

The drivers (``python -m detkd.cli ... --address HEAD``) run in subprocesses with the cluster's token
(``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``: tests/clusters.py) and the S3 keys; the worker node has no S3
keys of its own: they travel with the storage filesystem (a training run) or the sweep's job (a trial).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from clusters import two_node_cluster
from mlflow.tracking import MlflowClient
from servers import s3_server

BUCKET = "detkd-checkpoints"
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3"), buckets=(BUCKET,)) as server:
        yield server


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """One cluster for the module: a test that kills the worker node joins it again."""
    with two_node_cluster(tmp_path_factory.mktemp("nodes")) as cluster:
        yield cluster


def detkd(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python -m detkd.cli ARGS`` in its own process group, its output in ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "detkd.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def driver_env(cluster, s3) -> dict[str, str]:
    return {**cluster.env, **s3.env, "PYTHONPATH": SRC, "COLUMNS": "200"}


def wait_until(condition, *, what: str, process: subprocess.Popen, log: Path, wait_s: float = 180) -> None:
    deadline = time.monotonic() + wait_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the driver ended (exit {process.returncode}) before {what}: {log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}: {log.read_text()[-4000:]}")
        time.sleep(0.5)


def checkpoints(s3, prefix: str) -> set[str]:
    return {part for key in s3.keys(BUCKET, prefix) for part in key.split("/") if part.startswith("checkpoint_")}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.server
def test_a_lost_worker_node_rejoins_and_the_run_resumes_from_its_s3_checkpoint(
    tiny_dataset, tiny_config, tmp_path, s3, two_nodes
):
    """The head has no CPUs: the run's worker trains on the worker node, its controller (Ray Train puts it on
    the driver's node) on the head. The worker node is SIGKILLed after the first checkpoint reached S3 and
    joins again; Ray Train's failure policy restarts the worker group there, from the S3 checkpoint."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tiny_config(
        tiny_dataset,
        tmp_path,
        # 10 epochs of 4 steps: the kill (within a second of the first checkpoint) lands well before the end
        train={"epochs": 10, "log_every": 1, "checkpoint_every_steps": 2},
        run={"max_failures": 1, "storage_path": f"s3://{BUCKET}/lost-node", "storage_endpoint": s3.endpoint},
        tracking={"log_model": False, "tracking_uri": uri},
    )
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump(data))
    log = tmp_path / "train.log"
    driver = detkd("train", str(config), "--address", two_nodes.address, env=driver_env(two_nodes, s3), log=log)
    try:
        wait_until(lambda: checkpoints(s3, "lost-node/"), what="a checkpoint in S3", process=driver, log=log)
        two_nodes.kill_worker()  # the node of the run's only worker: its processes and its local disk
        time.sleep(2)
        two_nodes.start_worker()  # a node joins again: the same head, a new temp dir
        driver.wait(timeout=240)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    output = log.read_text()
    assert driver.returncode == 0, output[-4000:]
    assert (tmp_path / "models/tiny/model.pt").is_file()  # published by the driver on the head
    keys = [k for k in s3.keys(BUCKET, "lost-node/") if k != "lost-node/"]
    assert keys and all(k.startswith("lost-node/tiny-") for k in keys), keys[:10]  # one run folder, on S3
    assert not (tmp_path / "ray").exists()  # nothing went to a local folder
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("detkd").experiment_id])[0]
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps == list(range(1, 41)) and run.data.metrics["final/step"] == 40
    # Ray Train restarted the worker group on the new node, from an S3 checkpoint, not from scratch (the
    # restarted worker's own log lines come from a node that joined later: the driver may not show them)
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    assert resumed and min(resumed) >= 2, output[-4000:]


def stored_trials(s3, prefix: str) -> dict[str, str]:
    """trial id -> status, as the newest experiment state stored on S3 has them (what a restore reads)."""
    states = sorted(k for k in s3.keys(BUCKET, prefix) if re.search(r"/experiment_state-[^/]*\.json$", k))
    if not states:
        return {}
    body = s3.client().get_object(Bucket=BUCKET, Key=states[-1])["Body"].read()
    trials = {}
    for trial_json, _ in json.loads(body)["trial_data"]:
        trial = json.loads(trial_json)
        trials[trial["trial_id"]] = trial["status"]
    return trials


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.server
def test_a_sweep_on_two_nodes_resumes_after_its_driver_and_then_a_trials_node_are_lost(
    tiny_dataset, tiny_config, tmp_path, s3, two_nodes
):
    """Trials and the Tune experiment live under run.storage_path on S3. The driver is SIGKILLed once the
    stored experiment state has a finished trial: the same command again resumes the sweep there. Then the
    node of the other trial is lost after its first epoch's checkpoint: Tune retries the trial on the node
    that joins, and its Train run resumes from that checkpoint."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tiny_config(
        tiny_dataset,
        tmp_path,
        train={"epochs": 2},
        run={"storage_path": f"s3://{BUCKET}/team", "storage_endpoint": s3.endpoint},
        tracking={"log_model": False, "tracking_uri": uri},
    )
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(data))
    space = {
        "name": "nodes",
        "target": {"config": str(tmp_path / "teacher.yaml")},
        "parameters": {"optim.lr": {"grid": [2.0e-3, 4.0e-3]}},
        "budget": {"samples": 1, "max_concurrent": 1, "scheduler": "fifo", "search": "grid", "max_failures": 1},
        "workdir": str(tmp_path / "sweep"),
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    command = ["tune", str(tmp_path / "space.yaml"), "--address", two_nodes.address]
    env = driver_env(two_nodes, s3)
    stored = "team/sweeps/nodes/"

    def finished() -> set[str]:
        return {trial for trial, status in stored_trials(s3, f"{stored}tune/").items() if status == "TERMINATED"}

    first_log = tmp_path / "first.log"
    first = detkd(*command, env=env, log=first_log)
    try:
        wait_until(finished, what="a finished trial in the stored experiment state", process=first, log=first_log)
        done_before = finished()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver is lost: no chance to save anything more
        first.wait(timeout=30)
    assert len(done_before) == 1
    (done,) = done_before

    def other_trial_checkpoint() -> bool:
        return any("/checkpoint_" in key and f"-{done}-" not in key for key in s3.keys(BUCKET, f"{stored}train/"))

    second_log = tmp_path / "second.log"
    second = detkd(*command, env=env, log=second_log)
    try:
        wait_until(other_trial_checkpoint, what="the other trial's first checkpoint", process=second, log=second_log)
        two_nodes.kill_worker()  # the trial's node: its Tune actor, its Train controller and worker
        time.sleep(2)
        two_nodes.start_worker()
        second.wait(timeout=400)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    output = second_log.read_text()
    assert second.returncode == 0, output[-4000:]
    assert "sweep nodes: continuing" in output
    trials = pd.read_parquet(tmp_path / "sweep/trials.parquet")
    assert len(trials) == 2 and set(trials["state"]) == {"TERMINATED"}
    attempts = dict(zip(trials["trial_id"], trials["attempts"], strict=True))
    assert attempts[done] == 1  # the trial finished before the driver was lost was not run again
    (other,) = set(attempts) - {done}
    assert attempts[other] >= 2  # started again after the node was lost
    client = MlflowClient(uri)  # its Train run resumed from its S3 checkpoint, not from scratch
    experiments = [e.experiment_id for e in client.search_experiments()]
    other_runs = client.search_runs(experiments, filter_string=f"tags.`detkd.trial_id` = '{other}'")
    resumed = [m.value for r in other_runs for m in client.get_metric_history(r.info.run_id, "resumed_from_step")]
    assert resumed and min(resumed) >= 1, output[-4000:]
    assert (tmp_path / "sweep/best_config.yaml").is_file()
    keys = s3.keys(BUCKET, stored)
    assert f"{stored}sweep.json" in keys
    runs = {k.split("/")[4] for k in keys if k.startswith(f"{stored}train/") and k.count("/") > 4}
    assert len(runs) == 2  # each trial's Train run, with its checkpoints, on S3
    assert not (tmp_path / "sweep/tune").exists() and not (tmp_path / "sweep/train").exists()
