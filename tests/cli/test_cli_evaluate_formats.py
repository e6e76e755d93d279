"""``detkd evaluate`` on a YOLO or VOC split scores the same as on the COCO file of the same images."""

from __future__ import annotations

import re

import pytest
from realphotos import CLASSES, write_real_photo_formats
from typer.testing import CliRunner

from detkd.cli import app
from detkd.config import validate_config
from detkd.engine.plan import build_plan
from detkd.models import build_model, save_detector
from detkd.records import TrackingContext

runner = CliRunner()


@pytest.fixture()
def photos_and_model(tiny_config, tmp_path):
    paths = write_real_photo_formats(tmp_path / "photos", train=4, val=2, test=4)
    coco = paths["coco"]
    cfg = tiny_config(coco, tmp_path / "work")
    cfg["data"] = {"train": {"coco": str(coco / "train.json"), "images": str(coco / "images/train")}}
    cfg["train"]["batch_size"] = 2
    cfg = validate_config(cfg, source="test")
    plan = build_plan(cfg, tracking=TrackingContext(uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="t"))
    model = tmp_path / "model.pt"
    save_detector(model, build_model(cfg.model, num_classes=plan.num_classes), meta={"plan": plan.to_dict()})
    return paths, model


def _ap(output: str) -> str:
    match = re.search(r"\bAP\b\s+([0-9.]+)", output)
    assert match, output
    return match[1]


def test_yolo_and_voc_splits_score_like_their_coco_file(photos_and_model):
    paths, model = photos_and_model
    coco = paths["coco"]
    results = {
        "coco": runner.invoke(
            app, ["evaluate", str(model), "--coco", str(coco / "test.json"), "--images", str(coco / "images/test")]
        ),
        "yolo": runner.invoke(app, ["evaluate", str(model), "--yolo", str(paths["yolo"]), "--split", "test"]),
        "voc": runner.invoke(
            app, ["evaluate", str(model), "--voc", str(paths["voc"]), "--split", "test", "--classes", ",".join(CLASSES)]
        ),
    }
    for name, result in results.items():
        assert result.exit_code == 0, (name, result.output)
    assert _ap(results["coco"].output) == _ap(results["yolo"].output) == _ap(results["voc"].output)


def test_a_yolo_split_must_be_named(photos_and_model):
    paths, model = photos_and_model
    result = runner.invoke(app, ["evaluate", str(model), "--yolo", str(paths["yolo"])])
    assert result.exit_code == 2
    assert "--yolo needs --split" in result.output
