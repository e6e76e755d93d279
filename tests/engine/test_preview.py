"""``detkd data preview``'s module: the training views, drawn and listed, without Ray, MLflow or teachers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from detkd.config import Config, ConfigError
from detkd.data.dataset import DetectionDataset
from detkd.data.transforms import scale_batch
from detkd.engine.datasets import training_transform
from detkd.engine.plan import open_split
from detkd.engine.preview import write_preview
from detkd.engine.rng import seed_everything

AUGMENT = {"scale_jitter": {"short_side": [48, 80]}, "iou_crop": {"p": 0.7}, "zoom_out": {"p": 0.5}}


def _config(tiny_dataset, tiny_config, tmp_path, **sections) -> Config:
    return Config.model_validate(tiny_config(tiny_dataset, tmp_path, **sections))


def _same_boxes(a: list, b: list) -> bool:
    """Equal up to boxes.json's 3 decimals."""
    pairs = [(x, y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True)] if len(a) == len(b) else []
    return len(a) == len(b) and all(abs(x - y) <= 2e-3 for x, y in pairs)


def test_a_teacher_config_gives_one_view_twice_and_a_complete_boxes_json(tiny_dataset, tiny_config, tmp_path):
    cfg = _config(tiny_dataset, tiny_config, tmp_path)
    out = tmp_path / "preview"
    entries = write_preview(cfg, out=out, images=3, seed=0)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["boxes.json"] + [f"{k}_{view}.png" for k in range(3) for view in ("teacher", "student")]
    )
    assert json.loads((out / "boxes.json").read_text()) == entries
    source = open_split(cfg.data.train, skip_invalid=False)
    names = {source.label_of(c.id): c.name for c in source.categories}
    for k, entry in enumerate(entries):
        assert entry["sample"] == k and entry["image_id"] == source.records[k].image_id
        assert entry["teacher"] == entry["student"]  # scale 1: the student's view is the teacher's
        view = entry["teacher"]
        assert set(view) == {"size", "scale", "boxes", "labels", "names"} and view["scale"] == 1.0
        assert min(view["size"]) == 64 and len(view["boxes"]) == len(view["labels"]) == len(view["names"]) > 0
        assert view["names"] == [names[label] for label in view["labels"]]
        for x1, y1, x2, y2 in view["boxes"]:
            assert 0 <= x1 < x2 <= view["size"][1] and 0 <= y1 < y2 <= view["size"][0]
        with Image.open(out / f"{k}_teacher.png") as picture:
            assert picture.size == (view["size"][1], view["size"][0]) and picture.mode == "RGB"


def test_a_distill_config_draws_the_teachers_and_the_students_view_of_one_augmented_image(
    tiny_dataset, tiny_config, tmp_path
):
    cfg = _config(
        tiny_dataset,
        tiny_config,
        tmp_path,
        role="student",
        input={"size": 64, "scale": 0.5, "augment": AUGMENT},
        distill={"teachers": [{"source": "not-trained-yet", "input_scale": 2.0}], "mse": {}},
    )
    entries = write_preview(cfg, out=tmp_path / "p", images=4, seed=3)
    for entry in entries:
        teacher, student = entry["teacher"], entry["student"]
        assert (teacher["scale"], student["scale"]) == (2.0, 0.5)
        # both are the reference view rescaled, so student = teacher x (student size / teacher size), per axis
        fy, fx = (s / t for s, t in zip(student["size"], teacher["size"], strict=True))
        assert abs(fx - 0.25) < 0.02 and abs(fy - 0.25) < 0.02
        expected = [[x1 * fx, y1 * fy, x2 * fx, y2 * fy] for x1, y1, x2, y2 in teacher["boxes"]]
        assert _same_boxes(expected, student["boxes"])
        assert teacher["labels"] == student["labels"] and teacher["names"] == student["names"]

    # the student view is what the distiller gives the student: its scale_batch of the dataset's reference view
    source = open_split(cfg.data.train, skip_invalid=False)
    dataset = DetectionDataset(source, transform=training_transform(cfg, distilling=True), train=True)
    seed_everything(3)
    for k, entry in enumerate(entries):
        image, target = dataset[k]
        [small], [small_target] = scale_batch([image], [target], factor=0.5)
        assert entry["student"]["size"] == list(small.shape[-2:])
        assert _same_boxes(small_target["boxes"].tolist(), entry["student"]["boxes"])


def test_a_plain_student_view_is_exactly_its_training_sample(tiny_dataset, tiny_config, tmp_path):
    cfg = _config(tiny_dataset, tiny_config, tmp_path, input={"size": 64, "scale": 0.5, "augment": AUGMENT})
    entries = write_preview(cfg, out=tmp_path / "p", images=4, seed=1)
    source = open_split(cfg.data.train, skip_invalid=False)
    dataset = DetectionDataset(source, transform=training_transform(cfg, distilling=False), train=True)
    seed_everything(1)
    for k, entry in enumerate(entries):
        image, target = dataset[k]
        assert entry["student"]["size"] == list(image.shape[-2:])
        assert _same_boxes(target["boxes"].tolist(), entry["student"]["boxes"])
        assert entry["student"]["labels"] == target["labels"].tolist()


def test_the_preview_is_seeded(tiny_dataset, tiny_config, tmp_path):
    cfg = _config(tiny_dataset, tiny_config, tmp_path, input={"size": 64, "augment": AUGMENT})
    a = write_preview(cfg, out=tmp_path / "a", images=4, seed=7)
    assert write_preview(cfg, out=tmp_path / "b", images=4, seed=7) == a
    assert write_preview(cfg, out=tmp_path / "c", images=4, seed=8) != a
    assert (tmp_path / "a" / "0_teacher.png").read_bytes() == (tmp_path / "b" / "0_teacher.png").read_bytes()


def test_a_multiscale_teacher_is_previewed_with_its_training_jitter(tiny_dataset, tiny_config, tmp_path):
    cfg = _config(tiny_dataset, tiny_config, tmp_path, model={"multiscale": True})
    entries = write_preview(cfg, out=tmp_path / "p", images=8, seed=0)
    sides = {min(e["teacher"]["size"]) for e in entries}
    assert all(51 <= s <= 64 for s in sides) and len(sides) > 1


def test_a_non_empty_folder_is_kept_unless_overwrite(tiny_dataset, tiny_config, tmp_path):
    cfg = _config(tiny_dataset, tiny_config, tmp_path)
    out = tmp_path / "p"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        write_preview(cfg, out=out, images=1)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    write_preview(cfg, out=out, images=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["0_student.png", "0_teacher.png", "boxes.json"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".p")) == []  # no staging left behind


def test_the_preview_needs_neither_ray_nor_mlflow(tiny_dataset, tiny_config, tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_config(tiny_dataset, tmp_path)))
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from detkd.config import Config\n"
        "from detkd.engine.preview import write_preview\n"
        f"cfg = Config.model_validate(json.load(open({str(cfg_path)!r})))\n"
        f"write_preview(cfg, out=Path({str(tmp_path / 'p')!r}), images=1)\n"
        "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert torch.__version__  # the subprocess ran with this interpreter's torch
