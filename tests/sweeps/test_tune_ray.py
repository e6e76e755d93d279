"""Sweeps on a real local Ray (CPU, tiny models): ASHA, teacher sequences, resume, best config."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from detkd.cli import app
from detkd.sweeps.space import TEACHER_SEQUENCE, load_space
from detkd.sweeps.tuner import SweepOptions, run_sweep


def runs_of(tracking_uri: str, **tags):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("sweeps")
    if experiment is None:  # nothing logged yet
        return []
    query = " and ".join(f"tags.`detkd.{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment.experiment_id], filter_string=query)


def children(tracking_uri: str, run_id: str):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("sweeps")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")


def sweep(space_path, **options):
    loaded = load_space(space_path)
    return run_sweep(loaded, options=SweepOptions.from_budget(loaded.space.budget, **options))


@pytest.mark.slow
@pytest.mark.ray
def test_asha_stops_weak_trials_and_the_best_config_runs_with_distill(ray_cluster, sweep_files, sweep_uri):
    space, _ = sweep_files(
        {"optim.lr": {"grid": [1.0e-6, 4.0e-3]}, "distill.mgd.weight": {"loguniform": [1.0e-6, 1.0e-4]}},
        budget={"samples": 2, "max_concurrent": 2, "scheduler": "asha", "grace_epochs": 1, "reduction_factor": 4},
    )
    outcome = sweep(space)

    assert outcome.complete and len(outcome.trials) == 4
    stopped = [t for t in outcome.trials if t["stopped_early"]]
    assert stopped, "ASHA stopped no trial"
    assert all(t["epochs"] < t["planned_epochs"] for t in stopped)
    # trials 0 and 1 run first; of trials 2 and 3, the hopeless learning rate is always behind at the rung
    # (a good one may be stopped too, when it trails trial 1 at the rung: ASHA keeps the top quarter)
    assert any(t["param.optim.lr"] == 1.0e-6 for t in stopped)
    trials = pd.read_parquet(outcome.workdir / "trials.parquet")
    assert sorted(trials["trial_id"]) == sorted(t["trial_id"] for t in outcome.trials)
    assert {"val/AP", "param.optim.lr", "param.distill.mgd.weight", "stopped_early", "attempts"} <= set(trials)
    epochs = pd.read_parquet(outcome.workdir / "epochs.parquet")
    assert len(epochs) == trials["epochs"].sum()
    for t in stopped:  # every stopped trial trailed a trial that went on past that epoch
        at_rung = epochs[epochs["trial_epoch"] == t["epochs"]].set_index("trial_id")["val/AP"]
        went_on = [row["trial_id"] for row in outcome.trials if row["epochs"] > t["epochs"]]
        assert at_rung[t["trial_id"]] < max(at_rung[trial_id] for trial_id in went_on)
    for name in ("metric_vs_parameters.png", "learning_curves.png"):
        assert (outcome.workdir / "plots" / name).read_bytes()[:4] == b"\x89PNG"

    best = outcome.best
    assert best["param.optim.lr"] == 4.0e-3 and not best["stopped_early"]
    assert best["val/AP"] == max(t["val/AP"] for t in outcome.trials if not t["stopped_early"])
    assert 0.0 <= best["test/AP"] <= 1.0 and not math.isnan(best["test/AP"])

    sweep_run = MlflowClient(sweep_uri).get_run(outcome.sweep_run_id)
    assert sweep_run.data.tags["detkd.best_trial"] == best["trial_id"]
    assert sweep_run.data.metrics["best/test/AP"] == pytest.approx(best["test/AP"])
    trial_runs = children(sweep_uri, outcome.sweep_run_id)
    assert len([r for r in trial_runs if r.data.tags.get("detkd.kind") == "trial"]) == 4
    assert [r.data.tags.get("detkd.trial_id") for r in trial_runs if r.data.tags.get("detkd.best") == "true"] == [
        best["trial_id"]
    ]
    for r in trial_runs:
        if r.data.tags.get("detkd.kind") == "trial":
            assert r.info.status == ("KILLED" if r.data.tags["detkd.stopped_early"] == "true" else "FINISHED")
            history = MlflowClient(sweep_uri).get_metric_history(r.info.run_id, "val/AP")
            assert sorted(m.step for m in history) == list(range(1, len(history) + 1))  # one point per trial epoch

    best_config = yaml.safe_load(outcome.best_config.read_text())
    assert best_config["optim"]["lr"] == 4.0e-3
    assert best_config["distill"]["mgd"]["weight"] == pytest.approx(best["param.distill.mgd.weight"])
    assert best_config["data"]["test"] is not None  # the shipped config keeps the held-out split
    result = CliRunner().invoke(app, ["distill", str(outcome.best_config)])
    assert result.exit_code == 0, result.output
    assert "done" in result.output


@pytest.mark.slow
@pytest.mark.ray
def test_a_grid_over_teacher_sequences_runs_the_stages_in_order(ray_cluster, sweep_files, sweep_uri):
    space, _ = sweep_files(
        {TEACHER_SEQUENCE: {"grid": [["t_small", "t_wide"], ["t_wide"]]}},
        budget={"samples": 1, "max_concurrent": 2, "scheduler": "fifo", "search": "grid"},
        name="sequences",
    )
    outcome = sweep(space)
    assert outcome.complete and len(outcome.trials) == 2

    teacher_runs = {name: runs_of(sweep_uri, name=name)[0].info.run_id for name in ("t_small", "t_wide")}
    sequences = {}
    for trial in runs_of(sweep_uri, kind="trial", sweep="sequences"):
        stages = sorted(children(sweep_uri, trial.info.run_id), key=lambda r: int(r.data.tags.get("detkd.stage", 1)))
        sequences[trial.data.tags["detkd.teacher_sequence"]] = [r.data.tags["detkd.teacher.0.run_id"] for r in stages]
        assert trial.data.tags["detkd.teacher.0.run_id"] == sequences[trial.data.tags["detkd.teacher_sequence"]][0]
    assert sequences == {
        "t_small > t_wide": [teacher_runs["t_small"], teacher_runs["t_wide"]],
        "t_wide": [teacher_runs["t_wide"]],
    }
    # each teacher trained once for the whole sweep
    assert all(len(runs_of(sweep_uri, name=name)) == 1 for name in ("t_small", "t_wide"))


@pytest.mark.slow
@pytest.mark.ray
def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(ray_cluster, sweep_files, sweep_uri, sweep_store):
    space, _ = sweep_files(
        {"distill.mgd.weight": {"grid": [1.0e-5, 4.0e-5]}},
        budget={"samples": 1, "max_concurrent": 1, "scheduler": "fifo"},
        name="resumable",
    )
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    command = [sys.executable, "-m", "detkd.cli", "tune", str(space), "--address", address]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    finished = []
    while time.monotonic() < deadline and first.poll() is None:
        finished = [r for r in runs_of(sweep_uri, kind="trial", sweep="resumable") if r.info.status == "FINISHED"]
        if finished:
            break
        time.sleep(2)
    assert finished, "no trial finished"
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=180)
    assert first.returncode == 130, output[-3000:]
    assert "run the same command again to continue" in " ".join(output.split())
    done_before = {r.data.tags["detkd.trial_id"] for r in finished}

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    trials = pd.read_parquet(sweep_store[0] / "sweeps/resumable/trials.parquet")
    assert len(trials) == 2 and set(trials["state"]) == {"TERMINATED"}
    attempts = dict(zip(trials["trial_id"], trials["attempts"], strict=True))
    assert all(attempts[t] == 1 for t in done_before)  # finished trials were not started again
    for trial in runs_of(sweep_uri, kind="trial", sweep="resumable"):
        assert len(children(sweep_uri, trial.info.run_id)) == 1  # one training run per trial, resumed in place


@pytest.mark.slow
@pytest.mark.ray
def test_a_pipeline_tune_step_adds_the_tuned_student_beside_the_others(
    ray_cluster, sweep_files, sweep_uri, sweep_store
):
    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import run_pipeline

    space, pipeline = sweep_files(
        {"optim.lr": {"grid": [2.0e-3, 4.0e-3]}},
        budget={"samples": 1, "max_concurrent": 2, "scheduler": "fifo"},
        name="in_pipeline",
    )
    data = yaml.safe_load(pipeline.read_text())
    data["teachers"] = [t for t in data["teachers"] if t["name"] == "t_small"]  # the one the student learns from
    data["tune"] = [{"name": "student_tuned", "space": str(space)}]
    pipeline.write_text(yaml.safe_dump(data))
    rows = run_pipeline(load_pipeline(pipeline))

    by_name = {row.name: row for row in rows}
    assert set(by_name) == {"t_small", "student", "student_tuned"}
    assert {row.split for row in rows} == {"test"}  # the pipeline has a held-out split: all are scored on it
    assert by_name["student_tuned"].method == "mgd (tuned)"
    assert (sweep_store[0] / "models/student_tuned/model.pt").is_file()
    sweep_run = runs_of(sweep_uri, kind="sweep", sweep="in_pipeline")[0]
    pipeline_run = runs_of(sweep_uri, kind="pipeline")[0]
    assert sweep_run.data.tags["mlflow.parentRunId"] == pipeline_run.info.run_id
    assert len(runs_of(sweep_uri, name="t_small")) == 1  # the sweep found the pipeline's teacher again
