"""Distillation through Ray Train: progressive stages chain student weights; checkpoints hold the student alone."""

from __future__ import annotations

import json

import pytest
import torch
from factories import tracking_in
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from detkd.cli import app
from detkd.config import Config
from detkd.engine.build import build_trainable
from detkd.engine.plan import build_plan
from detkd.models import build_detector, load_detector, save_detector
from detkd.models.checkpoint import load_payload


def _teacher_checkpoint(path, *, fpn_channels: int, multiscale: bool = False, seed: int = 5):
    torch.manual_seed(seed)
    model = build_detector(
        arch="fcos",
        backbone="tiny",
        num_classes=3,
        min_level=3,
        max_level=6,
        fpn_channels=fpn_channels,
        head_convs=1,
        multiscale=multiscale,
    )
    save_detector(path, model, meta={"role": "teacher"})  # no run plan: configs give the teacher's input_scale
    return path


def test_init_from_teacher_and_copy_neck_head(tmp_path, tiny_dataset, tiny_config):
    teacher_path = _teacher_checkpoint(tmp_path / "t.pt", fpn_channels=32, multiscale=True)
    teacher, _ = load_detector(teacher_path)
    shared = teacher.detector.state_dict()
    data = tiny_config(
        tiny_dataset,
        tmp_path,
        input={"scale": 0.5},
        model={"min_level": 2, "max_level": 5},
        distill={
            "teachers": [{"source": str(teacher_path), "input_scale": 1.0}],
            "msad": {},
            "init_from_teacher": True,
        },
    )
    cfg = Config.model_validate(data)
    distiller, student = build_trainable(build_plan(cfg, tracking=tracking_in(tmp_path)))
    own = student.state_dict()
    same = [k for k in own if k in shared and own[k].shape == shared[k].shape]
    assert len(same) > 0.9 * len(own)  # same family: nearly everything matches
    assert all(torch.equal(own[k], shared[k]) for k in same)

    data["distill"] = {
        "teachers": [{"source": str(teacher_path), "input_scale": 1.0}],
        "mgd": {},
        "copy_neck_head": True,
    }
    distiller, student = build_trainable(build_plan(Config.model_validate(data), tracking=tracking_in(tmp_path)))
    own = student.state_dict()
    copied = [k for k in own if k.startswith(("backbone.fpn", "head")) and k in shared]
    assert copied and all(torch.equal(own[k], shared[k]) for k in copied)
    assert not torch.equal(own["backbone.body.stem.0.weight"], shared["backbone.body.stem.0.weight"])


@pytest.mark.slow
@pytest.mark.ray
def test_progressive_stages_chain_student_weights(tmp_path, tiny_dataset, tiny_config, ray_cluster, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    weak = _teacher_checkpoint(tmp_path / "weak.pt", fpn_channels=32, seed=6)
    strong = _teacher_checkpoint(tmp_path / "strong.pt", fpn_channels=64, seed=7)
    data = tiny_config(
        tiny_dataset,
        tmp_path,
        input={"scale": 0.5},
        model={"min_level": 2, "max_level": 5},
        train={"epochs": 1},
        tracking={"log_model": False},
        distill={
            "mgd": {"weight": 2e-5},
            "stages": [
                {"teacher": {"source": str(weak), "input_scale": 1.0}},
                # a vanishing lr: stage 2 must END where stage 1 ended if it STARTED there
                {"teacher": {"source": str(strong), "input_scale": 1.0}, "settings": {"optim": {"lr": 1e-12}}},
            ],
        },
    )
    data["name"], data["role"] = "prog", "student"
    cfg_path = tmp_path / "prog.yaml"
    cfg_path.write_text(json.dumps(data))
    summary = tmp_path / "row.json"
    result = CliRunner().invoke(app, ["distill", str(cfg_path), "--summary", str(summary)])
    assert result.exit_code == 0, result.output
    row = json.loads(summary.read_text())[0]
    assert row["method"] == "progressive" and row["input_size"] == 32

    models = tmp_path / "models"
    stage1 = load_payload(models / "prog-stage1/model.pt")
    stage2 = load_payload(models / "prog-stage2/model.pt")
    final = load_payload(models / "prog/model.pt")
    for payload in (stage1, stage2, final):
        # student alone: no teacher, adapter or generator tensors
        assert not any(k.startswith(("losses.", "student.", "_teachers")) for k in payload["state_dict"])
        assert payload["model"]["fpn_channels"] == 32 and payload["model"]["min_level"] == 2
    student_keys = set(build_detector(**stage1["model"]).state_dict())
    assert set(stage1["state_dict"]) == student_keys
    params = [k for k in stage1["state_dict"] if "running_" not in k and "num_batches" not in k]
    assert all(torch.allclose(stage1["state_dict"][k], stage2["state_dict"][k], atol=1e-6) for k in params)
    torch.manual_seed(0)
    fresh = build_detector(**stage1["model"]).state_dict()
    assert not all(torch.allclose(fresh[k], stage2["state_dict"][k], atol=1e-6) for k in params)
    assert all(torch.equal(stage2["state_dict"][k], final["state_dict"][k]) for k in params)

    # every stage's checkpoint loads in `detkd evaluate`
    for stage in ("prog-stage1", "prog-stage2"):
        evaluated = CliRunner().invoke(
            app,
            [
                "evaluate",
                "--checkpoint",
                str(models / stage / "model.pt"),
                "--coco",
                str(tiny_dataset / "annotations/instances_val.json"),
                "--images",
                str(tiny_dataset / "images/val"),
            ],
        )
        assert evaluated.exit_code == 0, evaluated.output

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("detkd").experiment_id])
    stages = sorted(
        (r.data.tags["detkd.stage"], r.data.tags["detkd.teacher.0"])
        for r in runs
        if r.data.tags.get("detkd.progressive") == "prog"
    )
    assert stages == [("1", str(weak)), ("2", str(strong))]
