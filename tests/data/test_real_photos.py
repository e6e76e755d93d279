"""The real-photo set (tests/realphotos.py): valid COCO, deterministic, boxes exactly around their objects."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from realphotos import CLASSES, MEASURED, photo_objects, write_real_photo_set

from detkd.data.coco import validate_coco


def test_every_split_is_valid_coco_with_varied_objects(tmp_path):
    files = write_real_photo_set(tmp_path, train=12, val=4, test=4)
    assert set(files) == {"train", "val", "test"}
    summary = validate_coco(files["train"], tmp_path / "images" / "train")
    source, problems = summary[0], summary[1]
    assert problems == []
    assert source.category_names == list(CLASSES)
    assert len(source.records) == 12 + len(MEASURED)  # the source photos are in the training split
    boxes = np.concatenate([r.boxes for r in source.records])
    sides = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    aspects = (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])
    assert sides.min() < 20 and sides.max() > 80  # small and large objects
    assert aspects.min() < 0.3 and aspects.max() > 1.2  # the rocket is tall, stretched objects are wide


def test_the_set_is_deterministic(tmp_path):
    a = write_real_photo_set(tmp_path / "a", train=3, val=1, test=0, seed=5)
    b = write_real_photo_set(tmp_path / "b", train=3, val=1, test=0, seed=5)
    assert json.loads(a["train"].read_text()) == json.loads(b["train"].read_text())
    first = sorted((tmp_path / "a" / "images" / "train").iterdir())[-1]
    second = tmp_path / "b" / "images" / "train" / first.name
    assert first.read_bytes() == second.read_bytes()


def test_each_box_holds_its_object(tmp_path):
    """The pixels inside a pasted box are the object's crop resized to it (up to JPEG loss)."""
    files = write_real_photo_set(tmp_path, train=6, val=0, test=0, max_objects=1, seed=2)
    coco = json.loads(files["train"].read_text())
    crops = {o.name: o.pixels for o in photo_objects()}
    collages = [i for i in coco["images"] if i["id"] > len(MEASURED)]
    checked = 0
    for image in collages:
        pixels = np.asarray(Image.open(tmp_path / "images" / "train" / image["file_name"]).convert("RGB"), np.float32)
        for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            name = CLASSES[ann["category_id"] - 1]
            inside = pixels[y : y + h, x : x + w]
            errors = []
            for crop in (o.pixels for o in photo_objects() if o.name == name):
                expected = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR), np.float32)
                errors.append(np.abs(inside - expected).mean())
            assert min(errors) < 12, (image["file_name"], name, errors)  # JPEG at quality 92
            checked += 1
    assert checked >= 5 and crops
