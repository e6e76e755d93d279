"""The real-photo set (tests/realphotos.py): valid COCO, deterministic, boxes exactly around their objects."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_the_three_formats_read_the_same_real_photos(tmp_path):
    from realphotos import write_real_photo_formats

    from detkd.data import open_source

    paths = write_real_photo_formats(tmp_path, train=6, val=3, test=3)
    for split in ("train", "val", "test"):
        coco = open_source(coco=paths["coco"] / f"{split}.json", images=paths["coco"] / "images" / split)
        yolo = open_source(yolo=paths["yolo"], split=split)
        voc = open_source(voc=paths["voc"], split=split, classes=list(CLASSES))
        assert coco.category_names == yolo.category_names == voc.category_names == list(CLASSES)
        by_name = {Path(r.file_name).name: r for r in coco.records}
        for other in (yolo, voc):
            assert sorted(Path(r.file_name).name for r in other.records) == sorted(by_name)
            for record in other.records:
                expected = by_name[Path(record.file_name).name]
                assert (record.width, record.height) == (expected.width, expected.height)
                np.testing.assert_allclose(record.boxes, expected.boxes, atol=1e-3)
                assert list(other.labels_of(record.category_ids)) == list(coco.labels_of(expected.category_ids))
