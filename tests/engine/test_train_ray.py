"""Integration: train through Ray Train, evaluate, and find everything in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from factories import SUMMARY_COLUMNS
from mlflow.tracking import MlflowClient

from detkd.config import Config, ConfigError
from detkd.data.coco import load_coco
from detkd.engine.evaluate import evaluate_checkpoint
from detkd.engine.launch import run_training
from detkd.engine.worker import TRAIN_STATE
from detkd.models import load_detector
from detkd.models.checkpoint import load_payload, save_payload


@pytest.mark.slow
@pytest.mark.ray
def test_train_evaluate_and_track(varied_dataset, tiny_config, ray_cluster, tmp_path, mlflow_uri, tracking):
    # non-square images of varied sizes with the long side capped: detkd evaluate must see the worker's view
    cfg = Config.model_validate(tiny_config(varied_dataset, tmp_path, input={"size": 64, "max_size": 72}))
    outcome = run_training(cfg, tracking=tracking)

    # the student-only checkpoint loads and rebuilds the same architecture
    model, meta = load_detector(outcome.model_path)
    assert meta["role"] == "teacher" and meta["plan"]["input"]["size"] == 64 and meta["step"] == 8
    assert model.detkd_config["fpn_channels"] == 32
    assert outcome.metrics["step"] == 8  # 2 epochs x (36 train images // batch 8)
    assert 0.0 <= outcome.metrics["val/AP"] <= 1.0

    # evaluating the checkpoint reproduces the worker's final validation AP exactly
    val = load_coco(varied_dataset / "annotations/instances_val.json", varied_dataset / "images/val")
    result = evaluate_checkpoint(outcome.model_path, val, batch_size=8, score_thresh=cfg.eval.score_thresh)
    assert result.metrics["AP"] == pytest.approx(outcome.metrics["val/AP"], abs=1e-9)
    assert result.images_per_s > 0

    # MLflow has the run, its params, the per-step loss history, datasets and the model
    client = MlflowClient(mlflow_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "fcos" and run.data.params["train.batch_size"] == "8"
    assert run.data.tags["detkd.role"] == "teacher"
    history = client.get_metric_history(outcome.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4, 6, 8]
    assert history[-1].value < history[0].value  # it learned something
    assert run.data.metrics["final/val/AP"] == pytest.approx(outcome.metrics["val/AP"])
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["train", "val"]
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"checkpoint", "plan.json"} <= artifacts  # the run plan: config, digest, input view, teachers
    plan = mlflow.artifacts.load_dict(f"runs:/{outcome.run_id}/plan.json")
    assert plan["digest"] == run.data.tags["detkd.config_digest"] and plan["input"] == meta["plan"]["input"]
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == outcome.run_id for m in logged)


@pytest.mark.slow
@pytest.mark.ray
def test_rerun_resumes_instead_of_retraining(tiny_dataset, tiny_config, ray_cluster, tmp_path, mlflow_uri, tracking):
    cfg = Config.model_validate(tiny_config(tiny_dataset, tmp_path, train={"epochs": 1}, tracking={"log_model": False}))
    first = run_training(cfg, tracking=tracking)
    weights = load_payload(first.model_path)["state_dict"]
    second = run_training(cfg, tracking=tracking)  # same config -> same Ray run name -> resume
    assert second.metrics["step"] == first.metrics["step"]
    again = load_payload(second.model_path)["state_dict"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    # the training log of the second run shows no new optimizer steps
    client = MlflowClient(mlflow_uri)
    assert client.get_metric_history(second.run_id, "train/loss") == []

    # after a code change the run folder's checkpoint no longer fits: refused, then --fresh starts over
    folder = next(Path(cfg.run.storage_path).glob("tiny-*"))
    state_file = sorted(folder.glob(f"checkpoint_*/{TRAIN_STATE}"))[-1]
    state = load_payload(state_file)
    state["model"] = {f"renamed.{k}": v for k, v in state["model"].items()}  # what a refactor does to keys
    save_payload(state_file, state)
    with pytest.raises(ConfigError, match="--fresh") as refused:
        run_training(cfg, tracking=tracking)
    assert str(folder) in str(refused.value)
    third = run_training(cfg, tracking=tracking, fresh=True)
    assert third.run_id != second.run_id and third.metrics["step"] == first.metrics["step"]
    assert [m.step for m in client.get_metric_history(third.run_id, "train/loss")] == [2, 4]


@pytest.mark.ray
def test_summary_json_from_cli(tiny_dataset, tiny_config, ray_cluster, tmp_path, mlflow_uri, monkeypatch):
    from typer.testing import CliRunner

    from detkd.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(json.dumps(tiny_config(tiny_dataset, tmp_path, tracking={"log_model": False})))
    summary = tmp_path / "summary.json"
    result = CliRunner().invoke(app, ["train", str(cfg_path), "--set", "train.epochs=1", "--summary", str(summary)])
    assert result.exit_code == 0, result.output
    rows = json.loads(summary.read_text())
    assert len(rows) == 1
    assert set(rows[0]) == SUMMARY_COLUMNS
    assert rows[0]["method"] == "kd_off"
    assert rows[0]["split"] == "val"  # the config has no test split: scored on val, and says so
    assert rows[0]["input_size"] == 64 and rows[0]["images_per_s"] > 0
    assert MlflowClient(mlflow_uri).get_run(rows[0]["mlflow_run_id"]).info.status == "FINISHED"
