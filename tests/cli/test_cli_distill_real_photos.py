"""Real photos end to end: a teacher trained on a YOLO dataset of real photographs, then
``detkd distill --teacher MODEL --data data.yaml`` trains the distilled student and its baseline and
prints both on the held-out split, writing the pipeline and run configs it used."""

from __future__ import annotations

import json

import pytest
import yaml
from realphotos import CLASSES, write_real_photo_formats
from typer.testing import CliRunner

from detkd.cli import app
from detkd.config import load_config

runner = CliRunner()


@pytest.mark.ray
@pytest.mark.slow
def test_distill_in_one_command_on_real_photos(ray_cluster, tmp_path, monkeypatch):
    paths = write_real_photo_formats(tmp_path / "photos", train=16, val=4, test=6)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    teacher_cfg = {
        "name": "photo_teacher",
        "data": {
            "train": {"yolo": str(paths["yolo"]), "split": "train"},
            "val": {"yolo": str(paths["yolo"]), "split": "val"},
        },
        "model": {"arch": "fcos", "backbone": "tiny", "fpn_channels": 32, "head_convs": 1, "min_level": 3},
        "input": {"size": 96, "max_size": 160, "augment": {"scale_jitter": {"short_side": [80, 112]}}},
        "train": {"epochs": 1, "batch_size": 4, "max_steps": 4, "ema": {"decay": 0.99, "warmup": 2}},
        "run": {"storage_path": str(tmp_path / "ray"), "output_dir": str(tmp_path / "models")},
    }
    cfg_path = tmp_path / "teacher.yaml"
    cfg_path.write_text(yaml.safe_dump(teacher_cfg))
    trained = runner.invoke(app, ["train", str(cfg_path)])
    assert trained.exit_code == 0, trained.output
    teacher = tmp_path / "models" / "photo_teacher" / "model.pt"
    assert teacher.is_file()

    out = tmp_path / "distill"
    summary = tmp_path / "summary.json"
    args = ["distill", "--teacher", str(teacher), "--data", str(paths["yolo"]), "--epochs", "1", "--batch-size", "4"]
    args += ["--out", str(out), "--summary", str(summary), "--set", "defaults.train.max_steps=3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(summary.read_text())}
    assert set(rows) >= {"student_baseline", "student_ssim"}
    for name in ("student_baseline", "student_ssim"):
        assert rows[name]["split"] == "test"
        assert rows[name]["input_size"] == 48  # half of the teacher's 96 px view
        assert 0.0 <= rows[name]["AP"] <= 1.0
    assert rows["student_ssim"]["method"] == "ssim" and rows["student_baseline"]["method"] == "kd_off"
    assert "student_ssim" in result.output and "student_baseline" in result.output

    # the configs it used: the next run can be a YAML file
    cfg = load_config(out / "configs" / "student_ssim.yaml")
    assert cfg.data.train.yolo is not None and cfg.data.test.split == "test"
    assert cfg.distill.teachers[0].source == str(teacher.resolve())
    assert (out / "pipeline.yaml").is_file()
    assert (out / "models" / "student_ssim" / "model.pt").is_file()
    assert len(CLASSES) == 4
