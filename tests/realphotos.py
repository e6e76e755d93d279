"""A small detection set of real photographs, built from the photos scikit-image ships (no download).

Each image is a crop of a real background photo (scikit-image's grass, brick, gravel and
Hubble pictures, or the empty parts of the photos themselves) with real objects pasted on it:
tight crops of objects whose boxes were measured once by hand on the source photos (the
astronaut's face, the cat's eyes, the coffee cup, the rocket...). Objects are pasted at
varied sizes (from about 10 % to 60 % of the image side) and aspect ratios (stretched by up
to 1.4x either way), never overlapping, so every box is exact by construction. The four
source photos themselves, resized, with their measured boxes, are part of the training split.

``write_real_photo_set(root)`` writes ``root/images/<split>/*.jpg`` and ``root/<split>.json``
(COCO), deterministically for a seed. Plain functions (``from realphotos import ...``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("face", "eye", "cup", "rocket")

# Boxes (x1, y1, x2, y2) in the source photo's pixels, measured by hand; the objects of CLASSES.
MEASURED = {
    "astronaut": [("face", (168, 40, 292, 166)), ("rocket", (352, 0, 466, 286))],
    "chelsea": [("eye", (135, 85, 207, 150)), ("eye", (293, 106, 347, 165))],
    "coffee": [("cup", (172, 16, 418, 308))],
    "rocket": [("rocket", (302, 124, 344, 408))],
}
BACKGROUNDS = ("grass", "brick", "gravel", "hubble_deep_field")


@dataclass(frozen=True)
class PhotoObject:
    name: str
    pixels: np.ndarray  # (h, w, 3) uint8: the tight crop


def _rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return _rgb(getattr(skimage.data, name)())


def photo_objects() -> list[PhotoObject]:
    """Every measured object as a tight crop of its photo."""
    out = []
    for photo, boxes in MEASURED.items():
        pixels = _photo(photo)
        for name, (x1, y1, x2, y2) in boxes:
            out.append(PhotoObject(name, pixels[y1:y2, x1:x2]))
    return out


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    source = _photo(str(rng.choice(BACKGROUNDS)))
    sh, sw = source.shape[:2]
    crop_w = int(rng.integers(min(sw, 128), sw + 1))
    crop_h = max(1, min(sh, round(crop_w * height / width)))
    x0 = int(rng.integers(0, sw - crop_w + 1))
    y0 = int(rng.integers(0, sh - crop_h + 1))
    tint = rng.uniform(0.7, 1.2, size=3)  # grayscale textures get a colour cast, as in real scenes
    crop = source[y0 : y0 + crop_h, x0 : x0 + crop_w].astype(np.float32) * tint
    return _resize(np.clip(crop, 0, 255).astype(np.uint8), width, height).copy()


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]], margin: int = 2) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < b[2] + margin and b[0] < x2 + margin and y1 < b[3] + margin and b[1] < y2 + margin for b in placed)


def collage(
    rng: np.random.Generator, objects: list[PhotoObject], *, width: int, height: int, count: int
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """A background crop with up to ``count`` objects pasted at random sizes, stretches and places."""
    image = _background(rng, width, height)
    placed: list[tuple[int, int, int, int]] = []
    labels: list[tuple[str, tuple[int, int, int, int]]] = []
    for _ in range(count):
        obj = objects[int(rng.integers(len(objects)))]
        oh, ow = obj.pixels.shape[:2]
        for _attempt in range(30):
            side = rng.uniform(0.10, 0.60) * min(width, height)  # the object's long side
            stretch = float(np.exp(rng.uniform(np.log(1 / 1.4), np.log(1.4))))
            aspect = ow / oh * stretch
            w = round(side if aspect >= 1 else side * aspect)
            h = round(side / aspect if aspect >= 1 else side)
            if not (4 <= w <= width and 4 <= h <= height):
                continue
            x1 = int(rng.integers(0, width - w + 1))
            y1 = int(rng.integers(0, height - h + 1))
            box = (x1, y1, x1 + w, y1 + h)
            if _overlaps(box, placed):
                continue
            image[y1 : y1 + h, x1 : x1 + w] = _resize(obj.pixels, w, h)
            placed.append(box)
            labels.append((obj.name, box))
            break
    return image, labels


def _source_photo(photo: str, *, short_side: int) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    pixels = _photo(photo)
    h, w = pixels.shape[:2]
    ratio = short_side / min(h, w)
    nw, nh = round(w * ratio), round(h * ratio)
    boxes = [
        (name, (round(x1 * ratio), round(y1 * ratio), round(x2 * ratio), round(y2 * ratio)))
        for name, (x1, y1, x2, y2) in MEASURED[photo]
    ]
    return _resize(pixels, nw, nh), boxes


def write_real_photo_set(
    root: Path,
    *,
    train: int = 24,
    val: int = 8,
    test: int = 8,
    seed: int = 0,
    sizes: tuple[int, int] = (96, 192),
    max_objects: int = 3,
) -> dict[str, Path]:
    """Write the set as COCO (``root/<split>.json`` + ``root/images/<split>/``); returns split -> JSON path.

    Image sides are drawn in ``sizes``; the training split also holds the four source photos
    (short side ``sizes[1]``) with their measured boxes.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    objects = photo_objects()
    categories = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(CLASSES)]
    category_id = {name: i + 1 for i, name in enumerate(CLASSES)}
    out: dict[str, Path] = {}
    annotation_id = 1
    for split, count in (("train", train), ("val", val), ("test", test)):
        if count == 0:
            continue
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        items = []
        if split == "train":
            items += [_source_photo(photo, short_side=sizes[1]) for photo in MEASURED]
        for _ in range(count):
            width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
            items.append(collage(rng, objects, width=width, height=height, count=int(rng.integers(1, max_objects + 1))))
        for image_id, (pixels, boxes) in enumerate(items, start=1):
            file_name = f"{split}_{image_id:04d}.jpg"
            Image.fromarray(pixels).save(folder / file_name, quality=92)
            height, width = pixels.shape[:2]
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            for name, (x1, y1, x2, y2) in boxes:
                annotations.append(
                    {
                        "id": annotation_id,
                        "image_id": image_id,
                        "category_id": category_id[name],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                    }
                )
                annotation_id += 1
        path = root / f"{split}.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        out[split] = path
    return out


def write_real_photo_formats(root: Path, **kw) -> dict[str, Path]:
    """The set in all three formats: ``{"coco": root/coco, "yolo": root/yolo/data.yaml, "voc": root/voc}``.

    COCO is written first (``write_real_photo_set``); YOLO and VOC are written from it by detkd's writers.
    """
    from detkd.data.coco import load_coco
    from detkd.data.voc import write_voc
    from detkd.data.yolo import write_yolo

    root = Path(root)
    files = write_real_photo_set(root / "coco", **kw)
    sources = {split: load_coco(path, root / "coco" / "images" / split) for split, path in files.items()}
    data_yaml = write_yolo(root / "yolo", sources)
    write_voc(root / "voc", sources)
    return {"coco": root / "coco", "yolo": data_yaml, "voc": root / "voc"}
