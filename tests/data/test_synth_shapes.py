"""synthesize: deterministic, tight in-range boxes, valid COCO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detkd.data.coco import validate_coco
from detkd.data.synth import SHAPES, SynthSpec, render_image, synthesize

SMALL = SynthSpec(images=24, size=64, seed=5, max_object=24, max_objects=5)


def _pixels(root: Path, split: str) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((root / "images" / split).glob("*.png"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    return root, synthesize(root, SMALL)


def test_layout_and_summary(small_set) -> None:
    root, summary = small_set
    assert summary["train"]["images"] == 19 and summary["val"]["images"] == 5
    for split in ("train", "val"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert len(coco["images"]) == summary[split]["images"]
        assert len(coco["annotations"]) == summary[split]["annotations"]
        files = sorted(p.name for p in (root / "images" / split).glob("*.png"))
        assert files == sorted(i["file_name"] for i in coco["images"])
        assert coco["categories"] == [
            {"id": 1, "name": "square", "supercategory": "shape"},
            {"id": 2, "name": "circle", "supercategory": "shape"},
            {"id": 3, "name": "triangle", "supercategory": "shape"},
        ]
        assert set(coco) >= {"info", "images", "annotations", "categories"}
    assert not list(root.rglob("*.tmp*"))
    with Image.open(next((root / "images" / "train").glob("*.png"))) as im:
        assert (im.mode, im.size, im.format) == ("RGB", (64, 64), "PNG")


def test_same_seed_is_identical_other_seed_differs(small_set, tmp_path) -> None:
    root, _ = small_set
    again = tmp_path / "again"
    synthesize(again, SMALL)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (root / name).read_bytes() == (again / name).read_bytes()
        first, second = _pixels(root, split), _pixels(again, split)
        assert first.keys() == second.keys()
        assert all(np.array_equal(first[k], second[k]) for k in first)

    other = tmp_path / "other"
    synthesize(other, SynthSpec(images=24, size=64, seed=6, max_object=24, max_objects=5))
    assert (root / "annotations/instances_train.json").read_bytes() != (
        other / "annotations/instances_train.json"
    ).read_bytes()
    assert not np.array_equal(_pixels(root, "train")["000001.png"], _pixels(other, "train")["000001.png"])


def test_images_do_not_depend_on_how_many_are_drawn() -> None:
    few = SynthSpec(images=3, size=48, seed=1, max_object=16)
    many = SynthSpec(images=50, size=48, seed=1, max_object=16)
    for index in range(3):
        a, boxes_a = render_image(few, index)
        b, boxes_b = render_image(many, index)
        assert np.array_equal(a, b) and boxes_a == boxes_b


def test_boxes_inside_images_with_valid_categories_and_sizes(small_set) -> None:
    root, _ = small_set
    sizes = []
    for split in ("train", "val"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        images = {i["id"]: i for i in coco["images"]}
        per_image = {i: 0 for i in images}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            image = images[ann["image_id"]]
            assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
            assert ann["category_id"] in (1, 2, 3)
            assert SMALL.min_object <= w <= SMALL.max_object and w == h
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            per_image[ann["image_id"]] += 1
            sizes.append(w)
        assert all(1 <= n <= SMALL.max_objects for n in per_image.values())
    # log-uniform: small objects are common
    assert np.mean(np.array(sizes) < 10) > 0.25


def test_output_validates_without_problems(small_set) -> None:
    root, _ = small_set
    for split in ("train", "val"):
        source, problems, summary = validate_coco(
            root / "annotations" / f"instances_{split}.json", root / "images" / split, verify_images=True
        )
        assert problems == []
        assert summary["images"] == len(source.records) > 0


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_box_is_tight_around_the_drawn_shape(shape: str) -> None:
    # flat background, no clutter or noise, one object: every changed pixel is the shape
    spec = SynthSpec(
        images=8, size=64, classes=(shape,), clutter=0.0, noise=0.0, max_objects=1, min_object=6, max_object=40
    )
    for index in range(4):
        pixels, objects = render_image(spec, index)
        ((_, (x, y, w, h)),) = objects
        background = pixels[0, 0] if x >= 1 or y >= 1 else pixels[-1, -1]
        changed = np.argwhere(np.any(pixels != background, axis=-1))
        (y0, x0), (y1, x1) = changed.min(0), changed.max(0) + 1  # pixel extents [x0, x1)
        assert np.floor(x) <= x0 <= np.floor(x) + 1 and np.ceil(x + w) - 1 <= x1 <= np.ceil(x + w)
        assert np.floor(y) <= y0 <= np.floor(y) + 1 and np.ceil(y + h) - 1 <= y1 <= np.ceil(y + h)


def test_spec_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown classes"):
        SynthSpec(classes=("square", "hexagon"))
    with pytest.raises(ValueError, match="min_object"):
        SynthSpec(min_object=50, max_object=40)
    assert SynthSpec(classes=["ring", "cross"]).classes == ("ring", "cross")
