"""``detkd distill --teacher --data``: the pipeline written from a teacher checkpoint and a dataset (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from detkd.config import ConfigError, load_config, validate_config
from detkd.engine.plan import build_plan
from detkd.models import build_model, save_detector
from detkd.pipeline.from_teacher import DistillRequest, distill_pipeline, write_distill_pipeline
from detkd.records import TrackingContext


@pytest.fixture()
def teacher_file(tiny_dataset, tiny_config, tmp_path) -> Path:
    """An untrained tiny FCOS saved with the run plan a teacher run would store (P3-P6, 64 px)."""
    cfg = validate_config(tiny_config(tiny_dataset, tmp_path), source="test")
    plan = build_plan(cfg, tracking=TrackingContext(uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="t"))
    path = tmp_path / "teacher" / "model.pt"
    save_detector(path, build_model(cfg.model, num_classes=plan.num_classes), meta={"plan": plan.to_dict()})
    return path


def coco_request(tiny_dataset: Path, teacher: Path, workdir: Path, **kw) -> DistillRequest:
    return DistillRequest(
        teacher=str(teacher),
        data=tiny_dataset / "annotations/instances_train.json",
        images=tiny_dataset / "images/train",
        workdir=workdir,
        **kw,
    )


def test_coco_file_alone_holds_out_every_fifth_image(tiny_dataset, teacher_file, tmp_path):
    spec = distill_pipeline(coco_request(tiny_dataset, teacher_file, tmp_path / "out"))
    assert set(spec["data"]) == {"train", "test"}
    train = json.loads(Path(spec["data"]["train"]["coco"]).read_text())
    held = json.loads(Path(spec["data"]["test"]["coco"]).read_text())
    original = json.loads((tiny_dataset / "annotations/instances_train.json").read_text())
    train_ids, held_ids = {i["id"] for i in train["images"]}, {i["id"] for i in held["images"]}
    assert not train_ids & held_ids
    assert train_ids | held_ids == {i["id"] for i in original["images"]}
    assert len(held_ids) == len(original["images"]) // 5
    assert {a["image_id"] for a in held["annotations"]} <= held_ids
    assert len(train["annotations"]) + len(held["annotations"]) == len(original["annotations"])


def test_student_follows_the_teacher_view_and_pyramid(tiny_dataset, teacher_file, tmp_path):
    spec = distill_pipeline(coco_request(tiny_dataset, teacher_file, tmp_path / "out", method="mgd", epochs=3))
    assert spec["defaults"]["input"]["size"] == 64  # the teacher's reference view
    model = spec["defaults"]["model"]
    assert (model["design"], model["min_level"], model["max_level"]) == ("lite", 2, 5)  # P3-P6 shifted down one
    names = [s["name"] for s in spec["students"]]
    assert names == ["student_baseline", "student_mgd"]
    distilled = spec["students"][1]["settings"]
    assert distilled["input"]["scale"] == 0.5
    assert distilled["distill"]["teachers"] == [{"source": str(teacher_file.resolve())}]
    assert "mgd" in distilled["distill"]
    assert spec["defaults"]["train"]["epochs"] == 3


def test_no_baseline_trains_only_the_distilled_student(tiny_dataset, teacher_file, tmp_path):
    spec = distill_pipeline(coco_request(tiny_dataset, teacher_file, tmp_path / "out", baseline=False))
    assert [s["name"] for s in spec["students"]] == ["student_ssim"]


def test_written_pipeline_and_run_configs_load(tiny_dataset, teacher_file, tmp_path):
    overrides = ["defaults.train.max_steps=7", "students.student_ssim.settings.distill.ssim.weight=2.0"]
    path = write_distill_pipeline(coco_request(tiny_dataset, teacher_file, tmp_path / "out"), overrides=overrides)
    assert path == (tmp_path / "out" / "pipeline.yaml").resolve()
    for name in ("student_baseline", "student_ssim"):
        cfg = load_config(path.parent / "configs" / f"{name}.yaml")
        assert cfg.name == name
        assert cfg.input.scale == 0.5
        assert cfg.train.max_steps == 7  # --set items are part of the written config
    distilled = load_config(path.parent / "configs" / "student_ssim.yaml")
    assert distilled.method == "ssim" and distilled.distill.ssim.weight == 2.0
    assert "--set defaults.train.max_steps=7" in path.read_text()
    assert load_config(path.parent / "configs" / "student_baseline.yaml").distill is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "kd"}, "--method 'kd'"),
        ({"student": "huge"}, "--student 'huge'"),
        ({"scale": 1.5}, "--scale 1.5"),
        ({"images": None}, "needs --images"),
        ({"teacher": "no/such/file.pt"}, "no such checkpoint file"),
    ],
)
def test_bad_requests_name_the_option(tiny_dataset, teacher_file, tmp_path, change, message):
    request = coco_request(tiny_dataset, teacher_file, tmp_path / "out")
    request = DistillRequest(**{**request.__dict__, **change})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        distill_pipeline(request)


def test_yolo_and_voc_splits_are_read_off_the_data(teacher_file, tmp_path):
    yolo = tmp_path / "yolo" / "data.yaml"
    yolo.parent.mkdir()
    yolo.write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": ["a"]}))
    from detkd.pipeline.from_teacher import data_section

    assert data_section(yolo, workdir=tmp_path) == {
        "train": {"yolo": str(yolo.resolve()), "split": "train"},
        "val": {"yolo": str(yolo.resolve()), "split": "val"},
    }
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("trainval", "test", "cat_trainval"):
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("000001\n")
    assert data_section(voc, workdir=tmp_path) == {
        "train": {"voc": str(voc.resolve()), "split": "trainval"},
        "test": {"voc": str(voc.resolve()), "split": "test"},
    }
    (voc / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(ConfigError, match="no val.txt or test.txt"):
        data_section(voc, workdir=tmp_path)


def test_pipeline_model_reference_must_exist(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "p",
                "workdir": str(tmp_path / "w"),
                "data": {"synth": {"images": 20}},
                "teachers": [{"name": "teacher"}],
            }
        )
    )
    with pytest.raises(ConfigError, match="run `detkd run"):
        distill_pipeline(DistillRequest(teacher=f"{spec}:teacher", data=tmp_path / "x.yaml"))
    with pytest.raises(ConfigError, match="has no model 'nobody'"):
        distill_pipeline(DistillRequest(teacher=f"{spec}:nobody", data=tmp_path / "x.yaml"))


def test_a_pipeline_refuses_weights_that_do_not_fit_before_any_step(tmp_path):
    """read_pipeline matches each model's weight file with its network on the meta device (no data needed)."""
    import torch

    from detkd.models import build_detector

    path = tmp_path / "other.pt"  # a ResNet-18 FCOS's weights for the default tiny FCOS
    torch.save(build_detector(arch="fcos", backbone="resnet18", num_classes=2).state_dict(), path)
    spec = tmp_path / "p.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "p",
                "workdir": str(tmp_path / "w"),
                "data": {"synth": {"images": 20}},
                "teachers": [{"name": "teacher", "settings": {"model": {"weights": str(path)}}}],
            }
        )
    )
    from detkd.pipeline.spec import read_pipeline

    with pytest.raises(ConfigError, match=r"teachers\[0\] \(teacher\): model.weights: .*other.pt"):
        read_pipeline(spec)
