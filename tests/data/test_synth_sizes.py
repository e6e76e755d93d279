"""synthesize with aspect_ratios and size_jitter: varied, non-square, odd sizes; valid, reproducible data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.data.coco import validate_coco
from detkd.data.dataset import DetectionDataset
from detkd.data.synth import SynthSpec, image_size, render_image, synthesize
from detkd.data.transforms import Compose, ResizeShortSide, ScaleBy

VARIED = SynthSpec(
    images=30, size=64, seed=7, aspect_ratios=(0.5, 2.0), size_jitter=0.25, min_object=4, max_object=24, max_objects=5
)


@pytest.fixture(scope="module")
def varied_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("varied")
    synthesize(root, VARIED)
    return root


def _images(root: Path) -> list[dict]:
    return [i for split in ("train", "val") for i in _coco(root, split)["images"]]


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_defaults_stay_square() -> None:
    spec = SynthSpec(images=5, size=48, max_object=16)
    assert {image_size(spec, i) for i in range(5)} == {(48, 48)}
    assert render_image(spec, 0)[0].shape == (48, 48, 3)


def test_sizes_and_aspect_ratios_vary(varied_set) -> None:
    images = _images(varied_set)
    sizes = [(i["width"], i["height"]) for i in images]
    assert len(set(sizes)) > len(sizes) // 2
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    assert any(w % 2 for w, _ in sizes) and any(h % 2 for _, h in sizes)  # odd sides occur
    (lo, hi), size, jitter = VARIED.aspect_ratios, VARIED.size, VARIED.size_jitter
    for w, h in sizes:
        # rounding to whole pixels moves the ratio and the area a little
        assert lo * (1 - 2 / h) <= w / h <= hi * (1 + 2 / h)
        assert size * (1 - jitter) - 1 <= math.sqrt(w * h) <= size * (1 + jitter) + 1
        assert min(w, h) >= VARIED.smallest_side
    for split in ("train", "val"):
        for info in _coco(varied_set, split)["images"]:
            with Image.open(varied_set / "images" / split / info["file_name"]) as im:
                assert im.size == (info["width"], info["height"])


def test_boxes_inside_and_object_sizes_kept(varied_set) -> None:
    sides = []
    for split in ("train", "val"):
        coco = _coco(varied_set, split)
        images = {i["id"]: i for i in coco["images"]}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            image = images[ann["image_id"]]
            assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
            assert VARIED.min_object <= w <= VARIED.max_object and w == h
            sides.append(w)
    assert np.mean(np.array(sides) < 10) > 0.25  # still log-uniform: small objects are common


def test_varied_output_validates(varied_set) -> None:
    for split in ("train", "val"):
        source, problems, summary = validate_coco(
            varied_set / "annotations" / f"instances_{split}.json", varied_set / "images" / split, verify_images=True
        )
        assert problems == []
        assert summary["images"] == len(source.records) > 0


def test_same_seed_reproduces_varied_data(varied_set, tmp_path) -> None:
    synthesize(tmp_path, VARIED)
    files = sorted(p.relative_to(varied_set) for p in varied_set.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all((varied_set / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)
    other = SynthSpec(**{**VARIED.to_dict(), "seed": 8})
    assert [image_size(other, i) for i in range(10)] != [image_size(VARIED, i) for i in range(10)]


def test_varied_images_through_resize_with_max_size(varied_set) -> None:
    # end to end: non-square images, a capped long side, a student view; boxes follow the recorded scale
    source, _, _ = validate_coco(varied_set / "annotations/instances_train.json", varied_set / "images/train")
    transform = Compose([ResizeShortSide(56, max_size=80), ScaleBy(0.5)])
    plain = DetectionDataset(source, train=False)
    resized = DetectionDataset(source, transform=transform, train=False)
    capped = 0
    for index in range(len(source.records)):
        (image, target), (_, original) = resized[index], plain[index]
        h, w = image.shape[-2:]
        capped += max(h, w) == 40
        assert max(h, w) <= 40 and (min(h, w) == 28 or max(h, w) == 40)
        record = source.records[index]
        assert torch.allclose(target["scale"], torch.tensor([w / record.width, h / record.height]))
        assert torch.allclose(target["boxes"], original["boxes"] * target["scale"].repeat(2))
    assert capped > 0


def test_spec_checks_for_varied_sizes() -> None:
    with pytest.raises(ValueError, match="aspect_ratios must be"):
        SynthSpec(aspect_ratios=(2.0, 0.5))
    with pytest.raises(ValueError, match="smallest image side, 32 px"):
        SynthSpec(size=64, aspect_ratios=(0.25, 4.0), max_object=40)
    with pytest.raises(ValueError, match="size_jitter"):
        SynthSpec(size_jitter=1.0)
    with pytest.raises(ValueError, match="rounds to no val image"):
        SynthSpec(images=2, val_fraction=0.2)
    with pytest.raises(ValueError, match="extra"):
        SynthSpec(width=3)
    assert SynthSpec(images=2, val_fraction=0.0).num_val == 0
    assert SynthSpec(classes="ring, cross").classes == ("ring", "cross")
    spec = SynthSpec(aspect_ratios=[0.5, 2])
    assert spec.aspect_ratios == (0.5, 2.0) and spec.to_dict()["aspect_ratios"] == [0.5, 2.0]
    assert SynthSpec.model_validate(spec.to_dict()) == spec  # a pipeline section round-trips through JSON/YAML
