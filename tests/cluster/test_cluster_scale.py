"""Cluster-scale behaviour on a local Ray: DDP equivalence, worker loss and restart, corrupt state, Ray Jobs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import tiny_pipeline_spec
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from detkd.cli import app
from detkd.cluster.jobs import client, follow, steps_of
from detkd.config import Config
from detkd.engine.launch import run_training
from detkd.models.checkpoint import CheckpointError, load_payload

REPO = Path(__file__).resolve().parents[2]


def _loss_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_reproduce_one_worker_with_the_same_global_batch(
    tiny_dataset, tiny_config, ray_cluster, tmp_path, mlflow_uri, tracking
):
    """Same global batch of 8: one worker x 8 images vs two DDP workers x 4 images.

    Frozen BN (no batch statistics) and no flips, so the only differences left are the
    per-worker normalisation of the detection loss and float reduction order.
    """
    curves = {}
    for workers in (1, 2):
        data = tiny_config(
            tiny_dataset,
            tmp_path / f"w{workers}",
            train={"epochs": 1, "batch_size": 8 // workers, "log_every": 1},
            model={"norm": "frozen_bn"},
            input={"augment": {"hflip": 0.0}},
            scaling={"num_workers": workers, "cpus_per_worker": 1},
            tracking={"log_model": False},
        )
        data["name"] = f"ddp{workers}"
        outcome = run_training(Config.model_validate(data), tracking=tracking)
        curves[workers] = _loss_history(mlflow_uri, outcome.run_id)
    one, two = curves[1], curves[2]
    # rank 0 alone logs: one MLflow run per training run, whatever the number of workers
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("detkd").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["ddp1", "ddp2"]
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
    assert two[0][1] == pytest.approx(one[0][1], rel=0.05)  # identical weights and images at step 1
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=0.15)


@pytest.mark.slow
@pytest.mark.ray
def test_killed_worker_restarts_from_last_checkpoint(
    tiny_dataset, tiny_config, ray_cluster, tmp_path, mlflow_uri, tracking
):
    data = tiny_config(
        tiny_dataset,
        tmp_path,
        train={"epochs": 2, "log_every": 1, "checkpoint_every_steps": 2},
        run={"max_failures": 2},
        debug={"fail_at_step": 5},
        tracking={"log_model": False},
    )
    outcome = run_training(Config.model_validate(data), tracking=tracking)
    assert (tmp_path / "models/tiny/.fault-injected").read_text() == "5"  # the fault really fired
    assert outcome.metrics["step"] == 8
    steps = [s for s, _ in _loss_history(mlflow_uri, outcome.run_id)]
    # killed after step 5, restarted from the step-4 checkpoint: only step 5 is repeated
    assert sorted(set(steps)) == list(range(1, 9))
    repeated = len(steps) - len(set(steps))
    assert repeated <= 2  # at most the checkpoint interval
    run = MlflowClient(mlflow_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"


def test_corrupt_training_state_is_refused_naming_the_file(tmp_path):
    from detkd.models.checkpoint import save_payload

    path = tmp_path / "train_state.pt"
    save_payload(path, {"step": 3, "model": {}})
    assert load_payload(path)["step"] == 3
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}: checksum mismatch"):
        load_payload(path)
    path.write_bytes(bytes(data[:40]))
    (tmp_path / "train_state.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match=f"{path}: the file is corrupted"):
        load_payload(path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate `ray start --head` on 127.0.0.1 shared by this module's job tests (its process group is
    stopped after them)."""
    tmp_path = tmp_path_factory.mktemp("ray-head")
    dashboard = _free_port()
    temp_dir = Path("/tmp") / f"detkd-ray-{os.getpid()}-{dashboard}"  # short: Ray's socket paths have a length limit
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        f"--port={_free_port()}",
        "--dashboard-host",
        "127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--num-cpus=2",
        # other Ray instances on this machine (a developer's, the session fixture) hold the default agent ports
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
    ]
    log = open(tmp_path / "ray-head.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            client(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                pytest.fail(f"ray head did not come up: {(tmp_path / 'ray-head.log').read_text()[-2000:]}")
            time.sleep(2)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # a head waits ~30 s for its jobs' drivers; nothing here needs them
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def project_copy(project: Path) -> Path:
    """A project folder (this repository's code and pyproject.toml), shipped as a job's working dir."""
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", project / "pyproject.toml")
    return project


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.server
def test_submit_runs_a_job_and_reports_failure(tiny_dataset, tiny_config, ray_head, tmp_path):
    project = project_copy(tmp_path / "project")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tiny_config(tiny_dataset, tmp_path / "out", train={"epochs": 1}, tracking={"log_model": False})
    (project / "good.yaml").write_text(json.dumps(data))
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "submit",
            str(project / "good.yaml"),
            "--address",
            ray_head,
            "--follow",
            "--env",
            f"MLFLOW_TRACKING_URI={uri}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "SUCCEEDED" in result.output
    assert (tmp_path / "out/models/tiny/model.pt").is_file()
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("detkd").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]

    listed = runner.invoke(app, ["jobs", "list", "--address", ray_head])
    assert listed.exit_code == 0 and "SUCCEEDED" in listed.output

    bad = dict(data, train={"epochs": 1, "batch_size": 1000})  # more than the data: the job fails
    (project / "bad.yaml").write_text(json.dumps(bad))
    failed = runner.invoke(
        app,
        ["submit", str(project / "bad.yaml"), "--address", ray_head, "--follow", "--env", f"MLFLOW_TRACKING_URI={uri}"],
    )
    assert failed.exit_code == 1, failed.output
    assert "FAILED" in failed.output
    job_id = failed.output.split("submitted job ")[1].split()[0]
    status = runner.invoke(app, ["jobs", "status", job_id, "--address", ray_head])
    assert status.exit_code == 1 and "FAILED" in status.output


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.server
def test_submitted_pipeline_runs_its_teachers_side_by_side_and_jobs_shows_each_step(ray_head, tmp_path):
    """``detkd submit PIPELINE --parallel 2`` to a 2-CPU ``ray start`` cluster: both teachers train at
    the same time there, the student learns from its teacher, and ``detkd jobs`` reads every step's state."""
    from detkd.pipeline.events import parse

    project = project_copy(tmp_path / "project")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    half = {"input": {"scale": 0.5}, "model": {"min_level": 2, "max_level": 6}}
    spec = tiny_pipeline_spec(
        "remote",
        tmp_path / "work",
        uri,
        synth={"images": 24, "test_images": 8},
        teachers=[{"name": "t_a", "settings": {"seed": 0}}, {"name": "t_b", "settings": {"seed": 1}}],
        students=[{"name": "s_kd", "settings": {**half, "distill": {"teachers": [{"source": "t_b"}], "ssim": {}}}}],
    )
    (project / "remote.yaml").write_text(json.dumps(spec))
    runner = CliRunner()
    result = runner.invoke(app, ["submit", str(project / "remote.yaml"), "--address", ray_head, "--parallel", "2"])
    assert result.exit_code == 0, result.output
    job_id = result.output.split("submitted job ")[1].split()[0]

    assert follow(job_id, address=ray_head, out=open(os.devnull, "w")) == "SUCCEEDED"  # noqa: SIM115

    status = runner.invoke(app, ["jobs", "status", job_id, "--address", ray_head])
    assert status.exit_code == 0, status.output
    info = client(ray_head).get_job_info(job_id)
    assert json.loads(info.metadata["detkd.steps"]) == ["data", "t_a", "t_b", "s_kd", "evaluate"]  # from the DAG
    states = steps_of(info, address=ray_head)
    assert [(s.step, s.state) for s in states] == [
        (name, "finished") for name in ("data", "t_a", "t_b", "s_kd", "evaluate")
    ]
    for name in ("data", "t_a", "t_b", "s_kd", "evaluate"):
        assert name in status.output
    listed = runner.invoke(app, ["jobs", "list", "--address", ray_head])
    assert "5/5 finished" in listed.output

    # the teachers overlapped in time on the cluster; the student started after its teacher finished
    events = parse(client(ray_head).get_job_logs(job_id))
    assert events["t_b"].started < events["t_a"].ended and events["t_a"].started < events["t_b"].ended
    assert events["s_kd"].started >= events["t_b"].ended

    client_ = MlflowClient(uri)
    runs = client_.search_runs([client_.get_experiment_by_name("remote").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"data", "t_a", "t_b", "s_kd", "evaluate"} <= set(by_name)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert json.loads(by_name["s_kd"].data.tags["detkd.teacher_runs"]) == [by_name["t_b"].info.run_id]
    assert by_name["s_kd"].data.tags["mlflow.parentRunId"] == by_name["t_a"].data.tags["mlflow.parentRunId"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.server
def test_a_kubeflow_model_task_with_a_ray_address_trains_on_that_cluster(ray_head, tmp_path):
    """The component code path ``ray_address``: ``detkd submit --follow --step`` from the task's process,
    whose outputs come back through the job's logs (the same outputs as a step run in the pod)."""
    pytest.importorskip("kfp")
    from detkd.cluster.kubeflow import detkd_step

    project = project_copy(tmp_path / "project")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_pipeline_spec(
        "kfp-remote", tmp_path / "work", uri, synth={"images": 16}, teachers=[{"name": "teacher"}]
    )
    path = project / "kfp_remote.yaml"
    path.write_text(json.dumps(spec))
    data = detkd_step(str(path), "data", [], "")  # in this process's machine, as a pod would
    outputs = detkd_step(str(path), "teacher", [], data["pipeline_run"], ray_address=ray_head)
    assert outputs["pipeline_run"] == data["pipeline_run"]
    assert Path(outputs["model"]).is_file() and outputs["metrics"]["step"] >= 1
    run = MlflowClient(uri).get_run(outputs["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "teacher"
    assert run.data.tags["detkd.pipeline_run"] == data["pipeline_run"]
    jobs = client(ray_head).list_jobs()
    assert any("step kfp_remote.yaml teacher" in job.entrypoint for job in jobs)  # it ran as a Ray job


def test_submit_refuses_specs_outside_a_project(tmp_path):
    spec = tmp_path / "x.yaml"
    spec.write_text("name: x\n")
    result = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://127.0.0.1:1"])
    assert result.exit_code == 2
    assert "no detkd project folder" in result.output


def test_submit_refuses_registry_teachers_without_a_reachable_tracking_server(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src/detkd").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "detkd"\n')
    spec = project / "distill.yaml"
    spec.write_text("name: s\ndistill:\n  teachers: [{source: 'models:/teachers@champion'}]\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "models:/ or mlflow: teachers" in result.output and "MLFLOW_TRACKING_URI" in result.output


def test_submit_passes_parallel_to_a_pipeline_and_refuses_it_for_one_run(tmp_path):
    from detkd.cluster.jobs import command_for
    from detkd.config import ConfigError

    project = tmp_path / "project"
    project.mkdir()
    pipeline = project / "p.yaml"
    pipeline.write_text("name: p\nteachers: [{name: t}]\n")
    command = command_for(pipeline, project, ["workdir=/mnt/w"], parallel=3)
    assert command[3:] == ["run", "p.yaml", "--set", "workdir=/mnt/w", "--parallel", "3"]
    assert "--parallel" not in command_for(pipeline, project, [])
    run = project / "run.yaml"
    run.write_text("name: r\n")
    with pytest.raises(ConfigError, match="--parallel and --step apply to pipeline specs"):
        command_for(run, project, [], parallel=2)


@pytest.mark.ray
@pytest.mark.server
def test_nothing_secret_leaves_the_laptop_with_a_job(ray_head, tmp_path):
    """Planted credential files, a gitignored file, an --env value and a password in a URI: none reaches the job's
    files, its command line, its metadata or detkd's output."""
    from detkd.cluster.jobs import client, runtime_env

    project = tmp_path / "project"
    (project / "src/detkd").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "detkd"\n')
    (project / ".gitignore").write_text("notes/\n")
    planted = [".env", "prod.env", ".netrc", "id_rsa", "deploy.pem", ".aws/credentials", "gcp-credentials.json"]
    planted += ["conf/secrets.yaml", "notes/passwords.txt"]
    for name in planted:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("hunter2\n")
    (project / "keep.yaml").write_text("name: keep\n")
    jobs = client(ray_head)
    listing = "import os; print('FILES', sorted(os.path.join(d, f) for d, _, fs in os.walk('.') for f in fs))"
    job_id = jobs.submit_job(entrypoint=f'python -c "{listing}"', runtime_env=runtime_env(project))
    deadline = time.time() + 120
    while str(jobs.get_job_status(job_id)) not in ("SUCCEEDED", "FAILED", "JobStatus.SUCCEEDED", "JobStatus.FAILED"):
        assert time.time() < deadline, jobs.get_job_logs(job_id)
        time.sleep(1)
    logs = jobs.get_job_logs(job_id)
    shipped = next(line for line in logs.splitlines() if line.startswith("FILES"))
    assert "./keep.yaml" in shipped and "./pyproject.toml" in shipped
    assert not [name for name in planted if name.split("/")[-1] in shipped], shipped

    # a password inside a URI given with --set is refused before anything is submitted, and not echoed
    pipeline = project / "p.yaml"
    pipeline.write_text("name: p\nteachers: [{name: t}]\n")
    refused = CliRunner().invoke(
        app,
        ["submit", str(pipeline), "--address", ray_head, "--set", "tracking.tracking_uri=http://bob:hunter2@mlf:5000"],
    )
    assert refused.exit_code == 2 and "--env" in refused.output and "hunter2" not in refused.output
    # --env values reach the job's environment only: not detkd's output, the command line or the metadata
    secret_env = ["--env", "AWS_SECRET_ACCESS_KEY=hunter2"]
    sent = CliRunner().invoke(app, ["submit", str(pipeline), "--address", ray_head, *secret_env])
    assert sent.exit_code == 0 and "hunter2" not in sent.output, sent.output
    info = jobs.get_job_info(sent.output.split("submitted job ")[1].split()[0])
    assert "hunter2" not in info.entrypoint and "hunter2" not in json.dumps(info.metadata or {})


def test_submit_of_one_step_runs_detkd_step_there(tmp_path):
    from detkd.cluster.jobs import command_for
    from detkd.config import ConfigError

    project = tmp_path / "project"
    project.mkdir()
    pipeline = project / "p.yaml"
    pipeline.write_text("name: p\nteachers: [{name: t}]\n")
    command = command_for(pipeline, project, ["workdir=/mnt/w"], step="t", pipeline_run="abc123")
    assert command[3:] == ["step", "p.yaml", "t", "--pipeline-run", "abc123", "--set", "workdir=/mnt/w"]
    with pytest.raises(ConfigError, match="--step runs one step"):
        command_for(pipeline, project, [], step="t", parallel=2)
