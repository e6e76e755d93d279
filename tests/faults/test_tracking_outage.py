"""Fault: the MLflow tracking server goes away in the middle of ``detkd train`` (a real ``mlflow server``
killed with SIGKILL, a real Ray Train run in a ``detkd`` subprocess).

Killed and started again on the same port: the run rides it out, every metric step arrives in order.
Killed for good: the training finishes and publishes its model, the command ends with one ``error:``
line, and ``detkd tracking replay`` delivers the rest once the server is back.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from servers import free_port
from typer.testing import CliRunner

from detkd.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.server]
DETKD = str(Path(sys.executable).with_name("detkd"))
STEP_LINE = re.compile(r"\[tiny\] epoch \d+/\d+ step (\d+)/(\d+)")


class Server:
    """``mlflow server`` on a fixed port with one backend store and artifact root, killed and started at will."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", "1", "--backend-store-uri"]
        command += [f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "a")
        # a session of its own: kill() ends the server and its uvicorn worker together, as a crash would
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"mlflow server did not come up: {log}") from exc
                time.sleep(0.3)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server is gone, no goodbye
            self.process.wait()


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    server = Server(root)
    server.start()
    yield server
    server.kill()


def start_training(tiny_dataset, tiny_config, work: Path, uri: str, *, wait_s: float, **train) -> subprocess.Popen:
    """``detkd train`` of the tiny teacher logging every step; its end waits ``wait_s`` for a silent server."""
    cfg = tiny_config(tiny_dataset, work, train={"log_every": 1, **train}, tracking={"outage_wait_s": wait_s})
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ""}
    return subprocess.Popen(
        [DETKD, "train", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_step(process: subprocess.Popen, step: int, seen: list[str]) -> None:
    """Read the run's output (stdout and stderr) until it logs ``step``."""
    for line in process.stdout:
        seen.append(line)
        found = STEP_LINE.search(line)
        if found and int(found.group(1)) >= step:
            return
    raise AssertionError(f"the run ended before step {step}:\n{''.join(seen)[-3000:]}")


def finish(process: subprocess.Popen, seen: list[str]) -> tuple[int, str]:
    """The exit code and everything the run printed."""
    out, _ = process.communicate(timeout=240)
    return process.returncode, "".join(seen) + out


def logged_steps(output: str) -> list[int]:
    """Every training step the run logged: 1..T of its ``step s/T`` lines (Ray may merge two lines into one)."""
    return list(range(1, int(STEP_LINE.search(output).group(2)) + 1))


def run_of(uri: str):
    runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("detkd").experiment_id], filter_string="tags.`detkd.name` = 'tiny'"
    )
    assert len(runs) == 1
    return runs[0]


def test_a_server_killed_and_started_again_costs_nothing(tiny_dataset, tiny_config, server, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # 120 steps, one checkpoint at the end: the server is back before the training ends, or, on a busy
    # machine, while the run's end waits for it (at most 120 s)
    process = start_training(tiny_dataset, tiny_config, work, server.uri, wait_s=120, epochs=30, checkpoint_every=30)
    seen: list[str] = []
    wait_for_step(process, 2, seen)
    server.kill()
    wait_for_step(process, 4, seen)  # training goes on while nothing answers
    server.start()
    code, err = finish(process, seen)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and not [line for line in err.splitlines() if line.startswith("error:")]
    run = run_of(server.uri)
    assert run.info.status == "FINISHED"
    history = [m.step for m in MlflowClient(server.uri).get_metric_history(run.info.run_id, "train/loss")]
    assert history == logged_steps(err)  # every step once, in order
    assert "final/val/AP" in run.data.metrics


def test_a_server_killed_for_good_keeps_the_training_and_replay_delivers_the_rest(
    tiny_dataset, tiny_config, server, tmp_path
):
    work = tmp_path / "work"
    work.mkdir()
    process = start_training(tiny_dataset, tiny_config, work, server.uri, wait_s=2, epochs=3)
    seen: list[str] = []
    wait_for_step(process, 2, seen)
    server.kill()
    code, err = finish(process, seen)

    # what the user sees: one error line naming what was kept and how to deliver it; exit code 1
    run_folder = work / "models" / "tiny"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert f"error: tracking server {server.uri} unreachable since " in errors[0]
    assert "not delivered to run " in errors[0] and "the run's end (FINISHED)" in errors[0]
    assert errors[0].endswith(f"deliver them with: detkd tracking replay {run_folder}")
    assert "Traceback" not in err
    # what is kept: the published model, the checkpoints, the outbox
    assert (run_folder / "model.pt").is_file() and (run_folder / "model.pt.sha256").is_file()
    assert list((work / "ray").glob("tiny-*/checkpoint_*/model.pt"))
    assert (run_folder / "tracking-outbox" / "records.jsonl").is_file()

    server.start()  # the same port, store and artifact root
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    replay = subprocess.run(
        [DETKD, "tracking", "replay", str(run_folder)], env=env, capture_output=True, text=True, timeout=180
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "delivered " in replay.stdout and "the run's end (FINISHED)" in replay.stdout.replace("\n", " ")
    assert not (run_folder / "tracking-outbox").exists()
    run = run_of(server.uri)
    client = MlflowClient(server.uri)
    assert run.info.status == "FINISHED"
    history = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history == logged_steps(err)  # every step once, in order
    assert run.data.tags["detkd.model_sha256"] == (run_folder / "model.pt.sha256").read_text().split()[0]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")} == {
        "checkpoint/model.pt",
        "checkpoint/model.pt.sha256",
    }
    models = client.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]

    again = CliRunner().invoke(app, ["tracking", "replay", str(run_folder)])  # delivered: nothing left to send
    assert again.exit_code == 2 and "no tracking outbox here" in again.output
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == history  # nothing twice
