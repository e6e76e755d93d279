"""``detkd data preview``: the command's files, its errors and exit codes."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from detkd.cli import app


def test_preview_writes_the_views_and_refuses_a_non_empty_folder(tiny_dataset, tiny_config, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path)
    cfg["input"] = {"size": 64, "hflip": 0.5}  # the old key still reads
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "preview"
    args = ["data", "preview", str(path), "--out", str(out), "--images", "2", "--seed", "1"]
    result = CliRunner().invoke(app, [*args, "--set", "input.scale=0.5", "--set", "input.augment.photometric={}"])
    assert result.exit_code == 0, result.output
    entries = json.loads((out / "boxes.json").read_text())
    assert [e["sample"] for e in entries] == [0, 1] and entries[0]["student"]["scale"] == 0.5
    assert (out / "1_student.png").is_file() and (out / "1_teacher.png").is_file()

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "error: --out" in again.output and "--overwrite" in again.output
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_preview_names_a_bad_key_with_one_error_line(tiny_dataset, tiny_config, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_dataset, tmp_path)))
    result = CliRunner().invoke(
        app,
        ["data", "preview", str(path), "--out", str(tmp_path / "p"), "--set", "input.augment.scale_jitter={}"],
    )
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "input.augment.scale_jitter" in errors[0] and "exactly one" in errors[0]
    assert not (tmp_path / "p").exists()


def test_preview_a_model_of_the_own_data_pipeline_on_real_photos(tmp_path, monkeypatch):
    """The shipped own_data pipeline, previewed on real photos where it expects a YOLO dataset."""
    import shutil
    from pathlib import Path

    from PIL import Image
    from realphotos import write_real_photo_formats

    paths = write_real_photo_formats(tmp_path / "photos", train=3, val=2, test=2)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(paths["yolo"].parent, tmp_path / "data" / "own")
    spec = Path(__file__).resolve().parents[2] / "pipelines" / "own_data.yaml"
    for model in ("teacher", "student_ssim"):
        out = tmp_path / f"preview_{model}"
        args = ["data", "preview", str(spec), "--model", model, "--out", str(out), "--images", "3"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        entries = json.loads((out / "boxes.json").read_text())
        assert len(entries) == 3
        for entry in entries:
            teacher = Image.open(out / f"{entry['sample']}_teacher.png")
            student = Image.open(out / f"{entry['sample']}_student.png")
            assert min(teacher.size) in range(256, 385)  # the pipeline's short-side jitter
            expected = 1.0 if model == "teacher" else 0.5
            assert abs(student.size[0] / teacher.size[0] - expected) < 0.02
    unknown = CliRunner().invoke(app, ["data", "preview", str(spec), "--model", "nobody", "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "no such teacher or student" in unknown.output
