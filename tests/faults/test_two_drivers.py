"""Two detkd drivers on one machine: two pipelines side by side, on a `ray start` head through RAY_ADDRESS (its
token on) and each on a private Ray of its own; and an address nothing answers at.

Each pipeline trains one tiny teacher (one Ray Train run, with Ray Train's placement-group cleaner watching it)
while another Ray instance lives on the machine: the session's ``ray_cluster`` (requested for that), the other
pipeline's private instance, or the head. Before, the cleaner of every run failed with "Found multiple active
Ray instances"; joining a head through RAY_ADDRESS failed on its token.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import tiny_pipeline_spec, write_yaml
from mlflow.tracking import MlflowClient
from servers import free_port

CONFUSED = "Found multiple active Ray instances"


def pipeline(tmp_path: Path, name: str) -> Path:
    uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
    spec = tiny_pipeline_spec(
        name, tmp_path / name, uri, synth={"images": 16, "test_images": 8}, teachers=[{"name": "t"}]
    )
    (tmp_path / name).mkdir()
    return write_yaml(tmp_path / f"{name}.yaml", spec)


def detkd(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - closed with the process (its file object is the child's stdout)
    return subprocess.Popen(
        [sys.executable, "-m", "detkd.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT, text=True
    )


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        assert proc.poll() is None, f"ended before '{text}':\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no '{text}' in {timeout_s} s:\n{path.read_text()[-3000:]}"
        time.sleep(0.5)


def side_by_side(tmp_path: Path, env: dict[str, str], ready: str) -> dict[str, str]:
    """Both pipelines run; the second starts once the first holds its Ray (its line ``ready``); their outputs."""
    logs = {name: tmp_path / f"{name}.log" for name in ("pa", "pb")}
    first = detkd("run", str(pipeline(tmp_path, "pa")), env=env, log=logs["pa"])
    wait_for(logs["pa"], ready, first)
    second = detkd("run", str(pipeline(tmp_path, "pb")), env=env, log=logs["pb"])
    for proc in (first, second):
        proc.wait(timeout=240)
        proc.stdout and proc.stdout.close()
    outputs = {name: log.read_text() for name, log in logs.items()}
    for name, proc in zip(logs, (first, second), strict=True):
        assert proc.returncode == 0, f"{name}:\n{outputs[name][-4000:]}"
        assert CONFUSED not in outputs[name], outputs[name][-4000:]
        assert "Traceback (most recent call last)" not in outputs[name], outputs[name][-4000:]
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name(name).experiment_id])
        statuses = {r.info.run_name: r.info.status for r in runs}
        assert statuses[f"pipeline:{name}"] == statuses["t"] == "FINISHED", statuses
        assert set(statuses.values()) == {"FINISHED"}, statuses
        assert (tmp_path / name / "models/t/model.pt").is_file()
    return outputs


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE")}
    return {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), **extra}


@pytest.mark.slow
@pytest.mark.ray
def test_two_pipelines_without_an_address_each_start_a_private_ray(tmp_path, ray_cluster):
    started = "started a private local Ray instance at "
    outputs = side_by_side(tmp_path, environment(), ready=started)
    addresses = {name: out.split(started)[1].split()[0] for name, out in outputs.items()}
    assert addresses["pa"] != addresses["pb"]
    assert ray_cluster.is_initialized()  # the session's instance lived beside both


@contextlib.contextmanager
def ray_head(tmp_path: Path) -> Iterator[str]:
    """``ray start --head`` on 127.0.0.1 (its own temp dir and ports, token auth on as Ray 2.60 starts it), with
    RAY_ADDRESS naming it in its processes' environment, as docs/cluster.md advises; yields its GCS address."""
    gcs, dashboard = free_port(), free_port()
    address = f"127.0.0.1:{gcs}"
    temp_dir = Path("/tmp") / f"detkd-ray-{os.getpid()}-{gcs}"  # short: Ray's socket paths have a length limit
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        f"--port={gcs}", "--dashboard-host", "127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
        # other Ray instances on this machine (a developer's, the session fixture) hold the default agent ports
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        "--include-dashboard=true", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    log = open(tmp_path / "ray-head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(
        cmd, env=environment(RAY_ADDRESS=address), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for(tmp_path / "ray-head.log", "Ray runtime started", head)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a head waits ~30 s for its drivers; they have ended
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.server
def test_two_pipelines_join_a_ray_start_head_through_ray_address(tmp_path, ray_cluster):
    with ray_head(tmp_path) as address:
        outputs = side_by_side(tmp_path, environment(RAY_ADDRESS=address), ready="joined the Ray cluster at")
    for out in outputs.values():
        assert f"joined the Ray cluster at {address} (RAY_ADDRESS)" in out
        assert "InvalidAuthToken" not in out


@pytest.mark.slow
def test_an_address_nothing_answers_at_is_one_error_line(tmp_path):
    port = free_port()  # bound and released: nothing listens there
    spec = pipeline(tmp_path, "pa")
    result = subprocess.run(
        [sys.executable, "-m", "detkd.cli", "run", str(spec), "--address", f"127.0.0.1:{port}"],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (--address): Connection refused"]
    assert "Traceback" not in result.stdout + result.stderr
    uri = f"sqlite:///{tmp_path / 'pa' / 'mlflow.db'}"
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("pa").experiment_id])
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert statuses.pop("pipeline:pa") == "FAILED"  # the pipeline's run is closed, not left RUNNING
    assert set(statuses.values()) <= {"FINISHED"}, statuses  # its data step, before Ray was needed
