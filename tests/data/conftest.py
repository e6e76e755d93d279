"""Fixtures for detkd.data tests: a small, realistic COCO dataset written to tmp_path."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# file_name -> (width, height, PIL mode, format)
IMAGE_FILES: dict[str, tuple[int, int, str, str]] = {
    "a.png": (64, 48, "RGB", "PNG"),
    "b.png": (80, 60, "L", "PNG"),  # grayscale
    "c.png": (50, 50, "RGBA", "PNG"),
    "d.png": (40, 30, "P", "PNG"),  # palette, no annotations
    "e.jpg": (100, 70, "RGB", "JPEG"),
}

BASE_COCO: dict[str, Any] = {
    "info": {"description": "detkd test set"},
    "images": [
        {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png", "width": 80, "height": 60},
        {"id": 3, "file_name": "c.png", "width": 50, "height": 50},
        {"id": 4, "file_name": "d.png", "width": 40, "height": 30},
        {"id": 5, "file_name": "e.jpg", "width": 100, "height": 70},
    ],
    # sparse ids, listed out of order: labels must follow the sorted ids 3, 7, 90
    "categories": [
        {"id": 7, "name": "dog"},
        {"id": 3, "name": "cat"},
        {"id": 90, "name": "bird"},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 15], "area": 300, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 64, 48], "area": 3072, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 90, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [0, 0, 80, 60], "area": 4800, "iscrowd": 1},
        # touches the far corner within the 1 px tolerance
        {"id": 5, "image_id": 3, "category_id": 7, "bbox": [45.5, 45.5, 5.4, 5.4], "area": 29.16},
        {"id": 6, "image_id": 5, "category_id": 90, "bbox": [30, 20, 40, 30], "area": 1200, "iscrowd": 0},
    ],
}


def make_image(path: Path, *, width: int, height: int, mode: str, fmt: str, seed: int = 0) -> None:
    """A small random image of the given PIL mode, deterministic per seed."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        image = rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)


@dataclass
class CocoDataset:
    root: Path
    ann_path: Path
    images_dir: Path

    def image_path(self, file_name: str) -> Path:
        return self.images_dir / file_name


CocoFactory = Callable[..., CocoDataset]


@pytest.fixture
def base_coco() -> dict[str, Any]:
    """A fresh deep copy of the valid COCO dict, free to mutate."""
    return copy.deepcopy(BASE_COCO)


@pytest.fixture
def coco_factory(tmp_path: Path) -> CocoFactory:
    """Write a COCO dataset: ``factory(data=None, raw_json=None, name="set")``.

    ``data`` defaults to the valid base dataset; ``raw_json`` writes text as is.
    All images of IMAGE_FILES are written to the images folder.
    """
    counter = iter(range(1000))

    def factory(data: dict[str, Any] | None = None, *, raw_json: str | None = None) -> CocoDataset:
        root = tmp_path / f"coco{next(counter)}"
        images_dir = root / "images"
        for index, (name, (w, h, mode, fmt)) in enumerate(IMAGE_FILES.items()):
            make_image(images_dir / name, width=w, height=h, mode=mode, fmt=fmt, seed=index)
        ann_path = root / "annotations.json"
        text = raw_json if raw_json is not None else json.dumps(data if data is not None else BASE_COCO)
        ann_path.write_text(text, encoding="utf-8")
        return CocoDataset(root=root, ann_path=ann_path, images_dir=images_dir)

    return factory


@pytest.fixture
def coco_set(coco_factory: CocoFactory) -> CocoDataset:
    """The valid base dataset on disk."""
    return coco_factory()
