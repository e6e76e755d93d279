"""One dataset written as COCO, YOLO and VOC reads back as the same records; YOLO and VOC convert to COCO losslessly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import FORMAT_CLASSES, FORMAT_IMAGES, YOLO_TOLERANCE_PX, FormatImage, write_all_formats, write_image

from detkd.data import open_source
from detkd.data.coco import load_coco
from detkd.data.coco_writer import images_folder, write_coco
from detkd.data.dataset import DetectionDataset
from detkd.data.image_files import ImageFileError, image_size


@pytest.fixture
def three(tmp_path):
    paths = write_all_formats(tmp_path, FORMAT_IMAGES, FORMAT_CLASSES)
    return {
        "coco": open_source(coco=paths.coco, images=paths.coco_images),
        "yolo": open_source(yolo=paths.yolo, split="train"),
        "voc": open_source(voc=paths.voc, split="train", classes=paths.classes),
    }


def test_three_formats_give_the_same_records(three):
    coco, yolo, voc = three["coco"], three["yolo"], three["voc"]
    assert coco.categories == yolo.categories == voc.categories  # ids are class indices, names the same
    # VOC (integer pixel boxes, difficult = crowd) is exactly COCO
    assert voc.records == coco.records
    for c, y in zip(coco.records, yolo.records, strict=True):
        assert (y.image_id, y.file_name, y.width, y.height) == (c.image_id, c.file_name, c.width, c.height)
        keep = ~c.iscrowd  # YOLO has no crowd regions
        np.testing.assert_allclose(y.boxes, c.boxes[keep], atol=YOLO_TOLERANCE_PX, rtol=0)
        np.testing.assert_array_equal(y.category_ids, c.category_ids[keep])
    assert sum(r.iscrowd.sum() for r in coco.records) == 1


def test_three_formats_give_the_same_training_targets(three):
    targets = {name: [t for _, t in DetectionDataset(s, train=False)] for name, s in three.items()}
    for c, y, v in zip(targets["coco"], targets["yolo"], targets["voc"], strict=True):
        assert c["labels"].tolist() == y["labels"].tolist() == v["labels"].tolist()
        np.testing.assert_allclose(y["boxes"].numpy(), c["boxes"].numpy(), atol=YOLO_TOLERANCE_PX, rtol=0)
        np.testing.assert_array_equal(v["boxes"].numpy(), c["boxes"].numpy())


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_to_coco_round_trip(three, fmt, tmp_path):
    source = three[fmt]
    written = write_coco(source, tmp_path / "out/ann.json")
    assert not [p for p in written.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    back = load_coco(written, images_folder(source), verify_images=True)
    assert back.categories == source.categories
    assert back.records == source.records  # boxes, categories, crowd flags, ids: exactly
    assert json.loads(written.read_text())["categories"][0] == {"id": 0, "name": "cat", "supercategory": ""}


def test_to_coco_of_a_split_over_several_folders_names_files_from_their_common_parent(tmp_path):
    paths = write_all_formats(tmp_path, [*FORMAT_IMAGES, FormatImage("e.png", 30, 30)], FORMAT_CLASSES)
    root = paths.yolo.parent
    (root / "images/train/e.png").rename(root / "images/e_moved.png")
    (root / "list.txt").write_text("images/e_moved.png\n")
    (root / "data.yaml").write_text("train: [images/train, list.txt]\nnames: [cat, dog, bird]\n")
    source = open_source(yolo=root / "data.yaml", split="train")
    assert images_folder(source) == root / "images"
    # sorted path order
    assert [r.file_name for r in source.records] == [
        "e_moved.png",
        "train/a.png",
        "train/b.png",
        "train/c.png",
        "train/sub/d.png",
    ]
    back = load_coco(write_coco(source, tmp_path / "ann.json"), images_folder(source), verify_images=True)
    assert back.records == source.records


@pytest.mark.parametrize("suffix", ["jpg", "png", "webp", "tif"])
def test_exif_rotated_images_are_refused_in_every_format(tmp_path, suffix):
    path = write_image(tmp_path / f"r.{suffix}", 20, 10, orientation=6)
    with pytest.raises(ImageFileError, match="EXIF orientation 6"):
        image_size(path, decode=False)
    assert image_size(write_image(tmp_path / f"u.{suffix}", 20, 10), decode=True) == (20, 10)
