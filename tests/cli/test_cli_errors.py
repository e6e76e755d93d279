"""The detkd command on real files: clear one-line errors, exit code 2, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detkd.cli import app

runner = CliRunner()


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_data_synth_then_check_ok(tmp_path):
    out = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--images", "12", "--size", "64", "--seed", "1"])
    assert result.exit_code == 0, result.output
    check = runner.invoke(
        app,
        [
            "data",
            "check",
            "--coco",
            str(out / "annotations/instances_train.json"),
            "--images",
            str(out / "images/train"),
        ],
    )
    assert check.exit_code == 0, check.output
    assert "no problems found" in check.output
    train = json.loads((out / "annotations/instances_train.json").read_text())
    assert f"{len(train['annotations'])}" in check.output


def test_data_check_reports_each_problem_and_exits_2(tiny_dataset, tmp_path):
    data = _copy_dataset(tiny_dataset, tmp_path / "data")
    ann_path = data / "annotations/instances_train.json"
    coco = json.loads(ann_path.read_text())
    coco["annotations"][0]["bbox"] = [1, 1, -3, 5]
    coco["annotations"][1]["category_id"] = 77
    bad_ann_id = coco["annotations"][0]["id"]
    first_image = coco["images"][0]
    (data / "images/train" / first_image["file_name"]).unlink()
    ann_path.write_text(json.dumps(coco))
    result = runner.invoke(app, ["data", "check", "--coco", str(ann_path), "--images", str(data / "images/train")])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 3, result.output
    text = result.output
    assert f"annotation id={bad_ann_id}" in text
    assert "77" in text
    assert first_image["file_name"] in text
    assert "Traceback" not in text


def test_malformed_json_is_one_line(tmp_path):
    ann = tmp_path / "bad.json"
    ann.write_text('{"images": [')
    (tmp_path / "imgs").mkdir()
    result = runner.invoke(app, ["data", "check", "--coco", str(ann), "--images", str(tmp_path / "imgs")])
    assert result.exit_code == 2
    assert "bad.json" in result.output and "Traceback" not in result.output


def test_train_refuses_invalid_data_before_starting_anything(tiny_dataset, tmp_path):
    data = _copy_dataset(tiny_dataset, tmp_path / "data")
    ann_path = data / "annotations/instances_train.json"
    coco = json.loads(ann_path.read_text())
    coco["annotations"].append({**coco["annotations"][0], "id": 99999, "bbox": [0, 0, 0, 4]})
    ann_path.write_text(json.dumps(coco))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        json.dumps(
            {
                "data": {"train": {"coco": str(ann_path), "images": str(data / "images/train")}},
                "run": {"storage_path": str(tmp_path / "ray"), "output_dir": str(tmp_path / "out")},
            }
        )
    )
    result = runner.invoke(app, ["train", str(cfg)], env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert result.exit_code == 2, result.output
    assert "annotation id=99999" in result.output
    assert not (tmp_path / "ray").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "m.db").exists()


def test_train_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {epochs: -1}\n")
    result = runner.invoke(app, ["train", str(cfg)])
    assert result.exit_code == 2
    assert "train.epochs" in result.output
    result = runner.invoke(app, ["train", str(cfg), "--set", "train.epochs"])
    assert result.exit_code == 2 and "key.path=value" in result.output
    result = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_evaluate_results_file_and_argument_errors(tmp_path):
    gt = {
        "images": [{"id": 1, "width": 50, "height": 50, "file_name": "a.png"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    dets = [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "score": 0.9}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    summary = tmp_path / "s.json"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--gt",
            str(tmp_path / "gt.json"),
            "--detections",
            str(tmp_path / "dets.json"),
            "--summary",
            str(summary),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "AP 1.0000" in result.output
    assert json.loads(summary.read_text())[0]["AP"] == 1.0
    result = runner.invoke(app, ["evaluate", "--gt", str(tmp_path / "gt.json")])
    assert result.exit_code == 2 and "--detections" in result.output
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 2
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--gt",
            str(tmp_path / "gt.json"),
            "--detections",
            str(tmp_path / "dets.json"),
            "--backend",
            "nope",
        ],
    )
    assert result.exit_code == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "flip_byte_copied_alone", "not_torch"])
def test_corrupt_checkpoint_is_refused_naming_the_file(tiny_dataset, tmp_path, damage):
    from detkd.models import build_detector, save_detector

    path = tmp_path / "model.pt"
    save_detector(path, build_detector(arch="fcos", backbone="tiny", num_classes=2), meta={"reference_size": 64})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage.startswith("flip_byte"):
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        if damage == "flip_byte_copied_alone":  # the checksum inside the file must catch it
            (tmp_path / "model.pt.sha256").unlink()
    else:
        path.write_text("hello")
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(path),
            "--coco",
            str(tiny_dataset / "annotations/instances_val.json"),
            "--images",
            str(tiny_dataset / "images/val"),
        ],
    )
    assert result.exit_code == 2
    assert str(path) in result.output.replace("\n", "")
    assert any(word in result.output for word in ("checksum mismatch", "corrupted", "not a readable"))


def test_train_refuses_a_batch_larger_than_the_data(tiny_dataset, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        json.dumps(
            {
                "data": {
                    "train": {
                        "coco": str(tiny_dataset / "annotations/instances_train.json"),
                        "images": str(tiny_dataset / "images/train"),
                    }
                },
                "train": {"batch_size": 1000},
                "run": {"storage_path": str(tmp_path / "ray"), "output_dir": str(tmp_path / "out")},
            }
        )
    )
    result = runner.invoke(app, ["train", str(cfg)], env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert result.exit_code == 2, result.output
    assert "train.batch_size" in result.output and "36" in result.output
    assert not (tmp_path / "ray").exists()
