"""Read and validate COCO "instances" JSON files.

Real datasets are messy. Instead of failing on the first bad record with a
traceback, :func:`validate_coco` walks the whole file, reports one
:class:`Problem` per bad record, and still builds a source from what is valid,
so a user can see everything that is wrong at once and choose to skip it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detkd.data.records import (
    Category,
    DatasetError,
    DetectionSource,
    ImageRecord,
    Problem,
    image_record_name,
)
from detkd.data.summary import SIZE_BINS, accept_or_raise, empty_summary, summarize

__all__ = ["SIZE_BINS", "FileImageReader", "load_coco", "validate_coco"]

REQUIRED_KEYS = ("images", "annotations", "categories")
BOX_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class FileImageReader:
    """Reads encoded image bytes from ``root / record.file_name`` (picklable for workers)."""

    root: Path

    def __call__(self, record: ImageRecord) -> bytes:
        path = Path(self.root) / record.file_name
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DatasetError(
                [
                    Problem(
                        str(path),
                        image_record_name(record.image_id, record.file_name),
                        f"cannot read image file: {exc.strerror or exc}",
                    )
                ]
            ) from None


# --------------------------------------------------------------------------- helpers


class _Invalid(Exception):
    """Internal: a field failed its type check; the message says why."""


def _as_int(value: Any, key: str) -> int:
    # JSON writers sometimes emit 640.0 for 640; accept integral floats, never bools.
    if isinstance(value, bool):
        raise _Invalid(f"'{key}' must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Invalid(f"'{key}' must be an integer, got {value!r}")


def _as_str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _as_bbox(value: Any) -> tuple[float, float, float, float]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not all(math.isfinite(v) for v in value)
    ):
        raise _Invalid(f"'bbox' must be a list of 4 finite numbers [x, y, w, h], got {value!r}")
    x, y, w, h = (float(v) for v in value)
    return x, y, w, h


def _as_crowd(value: Any) -> bool:
    if value in (0, 1) or isinstance(value, bool):
        return bool(value)
    raise _Invalid(f"'iscrowd' must be 0 or 1, got {value!r}")


def _hashable(value: Any) -> Any:
    """An id as a set member: integral floats as ints, unhashable values as their repr."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _missing_keys(record: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if k not in record]


def _read_json(ann_path: Path, file: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    try:
        text = ann_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [Problem(file, "-", "annotation file not found")]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(file, "-", f"cannot read annotation file: {exc}")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [Problem(file, "-", f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")]
    if not isinstance(data, dict):
        return None, [Problem(file, "-", f"top level must be a JSON object, got {type(data).__name__}")]
    problems = [Problem(file, "-", f"missing top-level key '{key}'") for key in REQUIRED_KEYS if key not in data]
    problems += [
        Problem(file, "-", f"top-level key '{key}' must be a list, got {type(data[key]).__name__}")
        for key in REQUIRED_KEYS
        if key in data and not isinstance(data[key], list)
    ]
    return (None if problems else data), problems


# --------------------------------------------------------------------------- sections


def _parse_categories(raw: list[Any], file: str, problems: list[Problem]) -> tuple[list[Category], set[Any]]:
    """Valid categories in file order (first of duplicate ids wins) and the ids of invalid ones."""
    categories: list[Category] = []
    seen: set[int] = set()
    rejected: set[Any] = set()
    for index, item in enumerate(raw):
        name = f"category at index {index}"
        if not isinstance(item, dict):
            problems.append(Problem(file, name, f"must be an object, got {type(item).__name__}"))
            continue
        if "id" in item:
            name = f"category id={item['id']}"
        missing = _missing_keys(item, ("id", "name"))
        if missing:
            problems.append(Problem(file, name, f"missing required key(s) {missing}"))
            if "id" in item:
                rejected.add(_hashable(item["id"]))
            continue
        try:
            cat_id = _as_int(item["id"], "id")
            cat_name = _as_str(item["name"], "name")
        except _Invalid as exc:
            problems.append(Problem(file, name, str(exc)))
            rejected.add(_hashable(item["id"]))
            continue
        if cat_id in seen:
            problems.append(Problem(file, name, "duplicate category id"))
            continue
        seen.add(cat_id)
        categories.append(Category(id=cat_id, name=cat_name))
    return categories, rejected - seen


@dataclass
class _Image:
    image_id: int
    file_name: str
    width: int
    height: int


def _parse_images(raw: list[Any], file: str, problems: list[Problem]) -> tuple[dict[int, _Image], set[Any]]:
    """Images with valid fields by id (first of duplicate ids wins) and the ids of invalid ones."""
    images: dict[int, _Image] = {}
    rejected: set[Any] = set()
    for index, item in enumerate(raw):
        name = f"image at index {index}"
        if not isinstance(item, dict):
            problems.append(Problem(file, name, f"must be an object, got {type(item).__name__}"))
            continue
        if "id" in item:
            name = image_record_name(item.get("id"), item.get("file_name", "?"))
        missing = _missing_keys(item, ("id", "file_name", "width", "height"))
        if missing:
            problems.append(Problem(file, name, f"missing required key(s) {missing}"))
            if "id" in item:
                rejected.add(_hashable(item["id"]))
            continue
        try:
            image_id = _as_int(item["id"], "id")
            file_name = _as_str(item["file_name"], "file_name")
            width = _as_int(item["width"], "width")
            height = _as_int(item["height"], "height")
            if width <= 0 or height <= 0:
                raise _Invalid(f"width and height must be positive, got {width}x{height}")
        except _Invalid as exc:
            problems.append(Problem(file, name, str(exc)))
            rejected.add(_hashable(item["id"]))
            continue
        if image_id in images:
            first = images[image_id].file_name
            problems.append(Problem(file, name, f"duplicate image id (first used by {first})"))
            continue
        images[image_id] = _Image(image_id, file_name, width, height)
    return images, rejected - set(images)


def _check_image_files(
    images: dict[int, _Image], images_dir: Path, *, verify_images: bool, problems: list[Problem]
) -> set[int]:
    """Ids of images whose file is missing, unreadable or of the wrong size."""
    bad: set[int] = set()
    if not images_dir.is_dir():
        if images:
            problems.append(Problem(str(images_dir), "-", "images folder not found"))
        return set(images)
    for image in images.values():
        path = images_dir / image.file_name
        name = image_record_name(image.image_id, image.file_name)
        if not path.is_file():
            problems.append(Problem(str(path), name, "image file not found"))
            bad.add(image.image_id)
            continue
        if not verify_images:
            continue
        try:
            with Image.open(path) as im:
                im.verify()  # structure and checksums; the file must be reopened after this
            with Image.open(path) as im:
                im.load()  # decode the pixels: catches truncated data verify() misses
                size = im.size
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            problems.append(Problem(str(path), name, f"unreadable or corrupt image: {exc}"))
            bad.add(image.image_id)
            continue
        if size != (image.width, image.height):
            problems.append(
                Problem(
                    str(path),
                    name,
                    f"real size {size[0]}x{size[1]} differs from declared {image.width}x{image.height}",
                )
            )
            bad.add(image.image_id)
    return bad


@dataclass
class _Annotation:
    ann_id: int
    image_id: int
    category_id: int
    box: tuple[float, float, float, float]  # xyxy
    iscrowd: bool


def _parse_annotations(
    raw: list[Any],
    file: str,
    *,
    images: dict[int, _Image],
    category_ids: set[int],
    rejected_images: set[Any],
    rejected_categories: set[Any],
    problems: list[Problem],
) -> list[_Annotation]:
    """Annotations that are valid on their own (the image file is checked separately).

    Annotations of an image or category that was itself reported invalid are
    dropped without a problem of their own: one bad record, one problem.
    """
    valid: list[_Annotation] = []
    seen: set[int] = set()
    for index, item in enumerate(raw):
        name = f"annotation at index {index}"
        if not isinstance(item, dict):
            problems.append(Problem(file, name, f"must be an object, got {type(item).__name__}"))
            continue
        if "id" in item:
            name = f"annotation id={item['id']}"
        missing = _missing_keys(item, ("id", "image_id", "category_id", "bbox"))
        if missing:
            problems.append(Problem(file, name, f"missing required key(s) {missing}"))
            continue
        try:
            ann_id = _as_int(item["id"], "id")
            image_id = _as_int(item["image_id"], "image_id")
            category_id = _as_int(item["category_id"], "category_id")
            x, y, w, h = _as_bbox(item["bbox"])
            iscrowd = _as_crowd(item.get("iscrowd", 0))
        except _Invalid as exc:
            problems.append(Problem(file, name, str(exc)))
            continue
        if ann_id in seen:
            problems.append(Problem(file, name, "duplicate annotation id"))
            continue
        seen.add(ann_id)
        if image_id in rejected_images or category_id in rejected_categories:
            continue
        if category_id not in category_ids:
            problems.append(Problem(file, name, f"unknown category id {category_id}"))
            continue
        image = images.get(image_id)
        if image is None:
            problems.append(Problem(file, name, f"image_id {image_id} is not in images"))
            continue
        if w <= 0 or h <= 0:
            problems.append(Problem(file, name, f"bbox {item['bbox']} has non-positive width/height"))
            continue
        tol = BOX_TOLERANCE_PX
        if x < -tol or y < -tol or x + w > image.width + tol or y + h > image.height + tol:
            problems.append(
                Problem(
                    file,
                    name,
                    f"bbox {item['bbox']} lies outside image id={image_id} ({image.width}x{image.height})",
                )
            )
            continue
        valid.append(_Annotation(ann_id, image_id, category_id, (x, y, x + w, y + h), iscrowd))
    return valid


def _build_records(images: list[_Image], annotations: list[_Annotation]) -> list[ImageRecord]:
    by_image: dict[int, list[_Annotation]] = {image.image_id: [] for image in images}
    for ann in annotations:
        by_image[ann.image_id].append(ann)
    records = []
    for image in images:
        anns = by_image[image.image_id]
        records.append(
            ImageRecord(
                image_id=image.image_id,
                file_name=image.file_name,
                width=image.width,
                height=image.height,
                boxes=np.array([a.box for a in anns], dtype=np.float32).reshape(-1, 4),
                category_ids=np.array([a.category_id for a in anns], dtype=np.int64),
                iscrowd=np.array([a.iscrowd for a in anns], dtype=bool),
                annotation_ids=np.array([a.ann_id for a in anns], dtype=np.int64),
            )
        )
    return records


# --------------------------------------------------------------------------- public API


def validate_coco(
    ann_path: Path, images_dir: Path, *, verify_images: bool = True
) -> tuple[DetectionSource | None, list[Problem], dict[str, Any]]:
    """Check a COCO instances file and its images; build a source from the valid records.

    Returns ``(source, problems, summary)``. ``source`` is None only when the
    file itself is unusable (unreadable, malformed JSON, missing top-level keys).
    An invalid annotation drops only itself; an image whose file is missing,
    unreadable or of the wrong size drops with its annotations. Missing files
    are always checked; decoding and size checks need ``verify_images``.
    """
    ann_path, images_dir = Path(ann_path), Path(images_dir)
    file = str(ann_path)
    data, problems = _read_json(ann_path, file)
    if data is None:
        return None, problems, empty_summary()

    categories, rejected_categories = _parse_categories(data["categories"], file, problems)
    images, rejected_images = _parse_images(data["images"], file, problems)
    annotations = _parse_annotations(
        data["annotations"],
        file,
        images=images,
        category_ids={c.id for c in categories},
        rejected_images=rejected_images,
        rejected_categories=rejected_categories,
        problems=problems,
    )
    bad_images = _check_image_files(images, images_dir, verify_images=verify_images, problems=problems)
    kept_images = [image for image in images.values() if image.image_id not in bad_images]
    kept_annotations = [a for a in annotations if a.image_id not in bad_images]

    records = _build_records(kept_images, kept_annotations)
    source = DetectionSource(
        categories=categories,
        records=records,
        image_reader=FileImageReader(images_dir),
        origin=file,
    )
    summary = summarize(
        records,
        categories,
        images_total=len(data["images"]),
        annotations_total=len(data["annotations"]),
    )
    return source, problems, summary


def load_coco(
    ann_path: Path,
    images_dir: Path,
    *,
    skip_invalid: bool = False,
    verify_images: bool = False,
) -> DetectionSource:
    """Load a COCO dataset, refusing bad data unless asked to skip it.

    Raises :class:`DatasetError` listing every problem unless ``skip_invalid``;
    with it, drops the bad records and logs a warning with what was dropped.
    A file that cannot be read as COCO at all always raises.
    """
    source, problems, summary = validate_coco(ann_path, images_dir, verify_images=verify_images)
    return accept_or_raise(source, problems, summary, skip_invalid=skip_invalid, origin=ann_path)
