"""The S3-compatible checkpoint store (a moto server) goes away in the middle of a teacher's training.

moto's server keeps its objects in memory (moto 5 has no state file), so a restarted server would come
back empty: a store that loses its data, not an outage. The two outages are therefore made without
restarting it:

* a store that hangs: the server process is stopped (SIGSTOP) for a few seconds and continued (SIGCONT);
  its connections stay open and nothing answers;
* a store that is down: the run reaches the server through a TCP forwarder (tests/servers.py ``TcpProxy``),
  which is closed (refused and cut connections, as from a stopped server) and opened again on the same port
  later, with the objects still there, as a store restarted with its disk.
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

import pytest
import yaml
from mlflow.tracking import MlflowClient
from servers import TcpProxy, s3_server

BUCKET = "detkd-checkpoints"
SRC = str(Path(__file__).resolve().parents[2] / "src")
RAY_PROCESS_LINE = re.compile(r"^\((?:raylet|[\w.:]+ pid=\d+)")  # a Ray worker's or controller's own log line
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def stored_step(s3) -> int:
    """The step of the newest checkpoint Ray Train has registered in the store (0 when none)."""
    snapshots = [k for k in s3.keys(BUCKET, "runs/") if k.endswith("/checkpoint_manager_snapshot.json")]
    if not snapshots:
        return 0
    state = json.loads(s3.client().get_object(Bucket=BUCKET, Key=snapshots[0])["Body"].read())
    latest = state.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("step", 0))


def wait_until(condition, *, what: str, driver: subprocess.Popen, wait_s: float = 180) -> None:
    deadline = time.monotonic() + wait_s
    while not condition():
        assert driver.poll() is None, f"the run ended (exit {driver.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def own_lines(text: str) -> list[str]:
    """The driver's own output lines (not the log lines Ray forwards from its workers and controller)."""
    lines = [ANSI.sub("", line) for line in text.splitlines()]
    return [line for line in lines if not RAY_PROCESS_LINE.match(line)]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.server
def test_a_hung_store_is_waited_for_and_a_store_that_went_away_ends_the_run_resumably(
    tiny_dataset, tiny_config, tmp_path
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with s3_server(tmp_path, buckets=(BUCKET,)) as s3:
        proxy = TcpProxy(int(s3.endpoint.rsplit(":", 1)[1]))
        proxy.start()
        data = tiny_config(
            tiny_dataset,
            tmp_path,
            train={"epochs": 3, "log_every": 1, "checkpoint_every_steps": 2},
            run={"max_failures": 1, "storage_path": f"s3://{BUCKET}/runs", "storage_endpoint": proxy.endpoint},
            tracking={"log_model": False, "tracking_uri": uri},
        )
        config = tmp_path / "teacher.yaml"
        config.write_text(yaml.safe_dump(data))
        env = {**os.environ, **s3.env, "AWS_ENDPOINT_URL": proxy.endpoint, "PYTHONPATH": SRC, "COLUMNS": "200"}
        command = [sys.executable, "-m", "detkd.cli", "train", str(config)]
        out, err = open(tmp_path / "first.out", "w"), open(tmp_path / "first.err", "w")  # noqa: SIM115
        driver = subprocess.Popen(command, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            # 1. the store hangs for 8 s once a checkpoint is in: the upload under way waits, training goes on
            wait_until(lambda: stored_step(s3) >= 2, what="a checkpoint in the store", driver=driver)
            s3.process.send_signal(signal.SIGSTOP)
            time.sleep(8)
            s3.process.send_signal(signal.SIGCONT)
            wait_until(lambda: stored_step(s3) >= 6, what="a checkpoint after the hang", driver=driver)
            before_down = (tmp_path / "first.out").read_text() + (tmp_path / "first.err").read_text()
            # 2. the store goes away for good: uploads are refused, the restart cannot read the checkpoint
            proxy.stop()
            kept = stored_step(s3)  # nothing reaches the store any more
            driver.wait(timeout=240)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
            out.close()
            err.close()
        stdout, stderr = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()

        assert "[FailurePolicy]" not in before_down and "resumed from" not in before_down  # the hang: no restart
        assert driver.returncode == 1, (stdout + stderr)[-4000:]
        errors = [line for line in own_lines(stderr) if line.startswith("error:")]
        assert len(errors) == 1, stderr[-4000:]
        assert f"checkpoint storage s3://{BUCKET}/runs at {proxy.endpoint} did not answer" in errors[0]
        assert "Could not connect" in errors[0] and "run the same command again" in errors[0]
        assert not [line for line in own_lines(stdout + stderr) if "Traceback (most recent call last)" in line]
        assert 6 <= kept < 12 and stored_step(s3) == kept  # the store kept what it had

        proxy.start()  # the store is back, with its objects
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        output = rerun.stdout + rerun.stderr
        assert rerun.returncode == 0, output[-4000:]
        # nothing good was lost: the rerun resumes from the newest whole checkpoint in the store, the last one Ray
        # registered or a newer one whose upload completed just before the store stopped answering
        resumed = [int(step) for step in re.findall(r"resumed from step (\d+)/12", output)]
        assert resumed and resumed[0] >= kept, output[-4000:]
        assert (tmp_path / "models/tiny/model.pt").is_file() and stored_step(s3) == 12

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("detkd").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # the failed attempt's run, continued
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")})
    assert steps == list(range(1, 13))
