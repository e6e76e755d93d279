"""The run plan: built once on the driver, without Ray or MLflow, and refusing what cannot run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import tracking_in
from typer.testing import CliRunner

from detkd.cli import app
from detkd.config import Config, ConfigError
from detkd.engine.launch import run_training
from detkd.engine.plan import build_plan
from detkd.engine.worker import TRAIN_STATE
from detkd.models.checkpoint import save_payload
from detkd.records import RunPlan


def test_plan_holds_the_run_and_round_trips(tiny_dataset, tiny_config, tmp_path):
    cfg = Config.model_validate(tiny_config(tiny_dataset, tmp_path, input={"size": 64, "max_size": 80, "scale": 0.5}))
    plan = build_plan(cfg, tracking=tracking_in(tmp_path))
    assert plan.input.size == 64 and plan.input.max_size == 80 and plan.input.scale == 0.5
    assert plan.input.model_size == 32 and len(plan.input.mean) == 3
    assert plan.num_classes == len(plan.categories) > 0
    assert plan.ray_name == f"tiny-{plan.digest}" and len(plan.digest) == 8
    assert Path(plan.config.data.train.coco).is_absolute()  # workers do not share the driver's cwd
    again = RunPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    # where results go does not change the digest; what is trained does
    moved = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": tmp_path / "elsewhere"})})
    assert build_plan(moved, tracking=tracking_in(tmp_path)).digest == plan.digest
    wider = cfg.model_copy(update={"model": cfg.model.model_copy(update={"fpn_channels": 64})})
    assert build_plan(wider, tracking=tracking_in(tmp_path)).digest != plan.digest


def test_plan_needs_neither_ray_nor_mlflow(tiny_dataset, tiny_config, tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_config(tiny_dataset, tmp_path)))
    code = (
        "import sys, json\n"
        "from detkd.config import Config\n"
        "from detkd.engine.plan import TrackingContext, build_plan\n"
        f"cfg = Config.model_validate(json.load(open({str(cfg_path)!r})))\n"
        "plan = build_plan(cfg, tracking=TrackingContext(uri='sqlite:///x.db', experiment='e'))\n"
        "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"model": {"fpn_channels": 33}}, "fpn_channels"),  # no GroupNorm group count divides 33
        ({"model": {"arch": "fasterrcnn", "multiscale": True}}, "one-stage"),
        ({"model": {"num_classes": 7}}, "model.num_classes"),
        ({"train": {"batch_size": 500}}, "train.batch_size"),
        ({"model": {"trainable_layers": 6}}, "model.trainable_layers: 6 is out of range for backbone tiny"),
    ],
)
def test_a_plan_that_cannot_run_fails_while_it_is_built(tiny_dataset, tiny_config, tmp_path, override, expected):
    data = tiny_config(tiny_dataset, tmp_path)
    for key, value in override.items():
        data[key] = {**data[key], **value}
    with pytest.raises(ConfigError, match=expected):
        build_plan(Config.model_validate(data), tracking=tracking_in(tmp_path))


def test_cli_refuses_an_unbuildable_model_with_one_line_and_exit_2(tiny_dataset, tiny_config, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(json.dumps(tiny_config(tiny_dataset, tmp_path)))
    result = CliRunner().invoke(app, ["train", str(cfg_path), "--set", "model.fpn_channels=33"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fpn_channels" in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "ray").exists()  # refused before any Ray run started


def test_a_checkpoint_that_no_longer_fits_is_refused_naming_the_run_folder(tiny_dataset, tiny_config, tmp_path):
    """A rerun after a code change: the run folder's checkpoint has other tensors than the model now built."""
    cfg = Config.model_validate(tiny_config(tiny_dataset, tmp_path))
    plan = build_plan(cfg, tracking=tracking_in(tmp_path))
    folder = Path(plan.config.run.storage_path) / plan.ray_name / "checkpoint_2026-01-01_00-00-00.000000"
    state = {"model": {"backbone.old_layer.weight": torch.zeros(3)}, "step": 4, "rng": []}
    save_payload(folder / TRAIN_STATE, state)
    save_payload(folder / "model.pt", {"state_dict": {}})  # a complete checkpoint has both files
    with pytest.raises(ConfigError) as caught:
        run_training(cfg, tracking=tracking_in(tmp_path))
    message = str(caught.value)
    assert str(folder.parent) in message and "--fresh" in message and "backbone.old_layer.weight" in message


def _misfit(tmp_path: Path) -> Path:
    """A ResNet-18 classifier's state dict given as detector weights (model.backbone_weights takes it)."""
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


def test_weight_files_are_matched_while_the_plan_is_built(tiny_dataset, tiny_config, tmp_path, caplog):
    import logging

    from factories import tiny_fcos

    data = tiny_config(tiny_dataset, tmp_path)
    other = tmp_path / "seven_classes.pth"  # the right network, trained on other classes
    torch.save(tiny_fcos(32, num_classes=7, head_convs=1).state_dict(), other)
    data["model"]["weights"] = str(other)
    with caplog.at_level(logging.INFO, logger="detkd"):
        build_plan(Config.model_validate(data), tracking=tracking_in(tmp_path))
    assert "tiny: model.weights seven_classes.pth: kept 71 of 73 tensors; re-initialised " in caplog.text
    assert "head.classification_head.cls_logits (7 -> 3 classes)" in caplog.text

    misfit = _misfit(tmp_path)
    data["model"]["weights"] = str(misfit)
    with pytest.raises(ConfigError) as caught:
        build_plan(Config.model_validate(data), tracking=tracking_in(tmp_path))
    assert re.match(rf"tiny: model.weights: {misfit}: does not fit the model .*first mismatches", str(caught.value))
    assert str(caught.value).endswith("a classifier's, not a detector's: model.backbone_weights takes a backbone file")
    data["model"].update(weights=None, backbone_weights=str(misfit))
    with pytest.raises(ConfigError, match=rf"^tiny: model.backbone_weights: {misfit}: the 'tiny' backbone has no"):
        build_plan(Config.model_validate(data), tracking=tracking_in(tmp_path))
    data["model"]["backbone_weights"] = None
    data["model"]["weights"] = str(tmp_path / "absent.pth")
    with pytest.raises(ConfigError, match=r"^tiny: model.weights: .*absent.pth: weights file not found"):
        build_plan(Config.model_validate(data), tracking=tracking_in(tmp_path))


def test_cli_refuses_misfitting_weights_with_one_line_and_exit_2_before_ray(tiny_dataset, tiny_config, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(json.dumps(tiny_config(tiny_dataset, tmp_path)))
    misfit = _misfit(tmp_path)
    result = CliRunner().invoke(app, ["train", str(cfg_path), "--set", f"model.weights={misfit}"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: tiny: model.weights: {misfit}: does not fit")
    assert "Traceback" not in result.output
    assert not (tmp_path / "ray").exists()  # refused before any Ray run started
