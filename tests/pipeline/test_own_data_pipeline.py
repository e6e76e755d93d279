"""``pipelines/own_data.yaml`` as shipped, on what a user brings: a YOLO dataset of real photographs at
data/own/ and torchvision's FCOS COCO file (random weights in its published layout) at weights/.
Only the budget is shrunk (--set); every path and model setting is the shipped file's."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from realphotos import write_real_photo_formats
from torch import nn
from torchvision.models import detection as tvd
from torchvision.ops import FrozenBatchNorm2d
from typer.testing import CliRunner

from detkd.cli import app

SPEC = Path(__file__).resolve().parents[2] / "pipelines" / "own_data.yaml"
SHRINK = [
    "defaults.input.size=96",
    "defaults.input.max_size=160",
    "defaults.input.augment.scale_jitter.short_side=[80, 112]",
    "defaults.train.batch_size=4",
    "defaults.train.max_steps=2",
    "defaults.train.epochs=1",
    "teachers.teacher.settings.train.epochs=1",
]


def save_torchvision_fcos(path: Path) -> None:
    """torchvision's fcos_resnet50_fpn state dict as its COCO file holds it (FrozenBatchNorm2d body)."""
    torch.manual_seed(0)
    model = tvd.fcos_resnet50_fpn(weights=None, weights_backbone=None)

    def freeze(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.load_state_dict({k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"})
                setattr(module, name, frozen)
            else:
                freeze(child)

    freeze(model.backbone.body)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


@pytest.mark.ray
@pytest.mark.slow
def test_own_data_pipeline_as_shipped(ray_cluster, tmp_path, monkeypatch, caplog):
    paths = write_real_photo_formats(tmp_path / "photos", train=12, val=4, test=6)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(paths["yolo"].parent, tmp_path / "data" / "own")
    save_torchvision_fcos(tmp_path / "weights" / "fcos_resnet50_fpn_coco-99b0c9b7.pth")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = tmp_path / "summary.json"
    args = ["run", str(SPEC), "--summary", str(summary), "--set", f"tracking.tracking_uri={uri}"]
    for item in SHRINK:
        args += ["--set", item]
    with caplog.at_level(logging.INFO, logger="detkd"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    kept = [m for m in caplog.messages if "fcos_resnet50_fpn_coco-99b0c9b7.pth: kept" in m]
    assert kept and "re-initialised head.classification_head.cls_logits (90 -> 4 classes)" in kept[0]

    rows = {row["name"]: row for row in json.loads(summary.read_text())}
    assert {"teacher", "student_baseline", "student_ssim"} <= set(rows)
    assert all(rows[n]["split"] == "test" for n in ("teacher", "student_baseline", "student_ssim"))
    assert rows["student_ssim"]["input_size"] == rows["teacher"]["input_size"] // 2 == 48
    assert (tmp_path / "runs" / "own_data" / "models" / "student_ssim" / "model.pt").is_file()

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert len(client.search_model_versions("name='own-data-student'")) == 1
    assert client.get_registered_model("own-data-student").aliases in ({"champion": 1}, {"challenger": 1})
