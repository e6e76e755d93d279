"""In-memory dataset records shared by every reader, writer and loader.

A :class:`DetectionSource` is what the rest of detkd consumes: categories, one
:class:`ImageRecord` per image with its boxes, and a callable that returns the
encoded image bytes. Where the bytes come from (a COCO folder, Parquet shards)
is hidden behind that callable, so training and evaluation never care.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Category",
    "DatasetError",
    "DetectionSource",
    "ImageRecord",
    "Problem",
    "image_record_name",
]

MAX_PRINTED_PROBLEMS = 50


@dataclass(frozen=True)
class Category:
    """A COCO category: the id as written in the file and its name."""

    id: int
    name: str


@dataclass
class ImageRecord:
    """One image and its annotations, boxes in absolute pixel xyxy.

    Arrays are coerced to the documented dtypes and shapes on construction so
    that every consumer can rely on them (an empty image has a (0, 4) box array).
    """

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 xyxy absolute pixels
    category_ids: np.ndarray  # (N,) int64 COCO category ids
    iscrowd: np.ndarray  # (N,) bool
    annotation_ids: np.ndarray  # (N,) int64

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.category_ids = np.asarray(self.category_ids, dtype=np.int64).reshape(-1)
        self.iscrowd = np.asarray(self.iscrowd, dtype=bool).reshape(-1)
        self.annotation_ids = np.asarray(self.annotation_ids, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        lengths = {len(self.category_ids), len(self.iscrowd), len(self.annotation_ids)}
        if lengths != {n}:
            raise ValueError(
                f"ImageRecord image_id={self.image_id}: boxes, category_ids, iscrowd and "
                f"annotation_ids must have the same length, got {n} boxes and {sorted(lengths)}"
            )

    @property
    def num_annotations(self) -> int:
        return len(self.boxes)

    def __eq__(self, other: object) -> bool:
        # Arrays make the generated __eq__ ambiguous; compare them element-wise.
        if not isinstance(other, ImageRecord):
            return NotImplemented
        return (
            self.image_id == other.image_id
            and self.file_name == other.file_name
            and self.width == other.width
            and self.height == other.height
            and np.array_equal(self.boxes, other.boxes)
            and np.array_equal(self.category_ids, other.category_ids)
            and np.array_equal(self.iscrowd, other.iscrowd)
            and np.array_equal(self.annotation_ids, other.annotation_ids)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass default


def image_record_name(image_id: object, file_name: object) -> str:
    """The record label used in problems about one image, e.g. ``image id=12 (a.png)``."""
    return f"image id={image_id} ({file_name})"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located by file and record."""

    file: str
    record: str  # e.g. "image id=12 (a.png)", "annotation id=7", "category id=3" or "-"
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: {self.message}"


class DatasetError(ValueError):
    """Bad user data: carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [str(p) for p in self.problems[:MAX_PRINTED_PROBLEMS]]
        hidden = len(self.problems) - MAX_PRINTED_PROBLEMS
        if hidden > 0:
            lines.append(f"... and {hidden} more problems")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the problems when the error crosses a process boundary (DataLoader workers).
        return (type(self), (self.problems,))


@dataclass
class DetectionSource:
    """A detection dataset: categories, image records and a way to read image bytes.

    Labels are contiguous: the category with the smallest id is label 1, and so
    on; 0 is the background. COCO ids are often sparse (1..90 with gaps), models
    want dense class indices.
    """

    categories: list[Category]
    records: list[ImageRecord]
    image_reader: Callable[[ImageRecord], bytes]  # returns the encoded image bytes
    origin: str  # human readable path
    _labels: dict[int, int] = field(init=False, repr=False, compare=False)
    _labels_key: tuple[Category, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._refresh_labels()

    def _refresh_labels(self) -> None:
        key = tuple(self.categories)
        ordered = sorted(key, key=lambda c: c.id)
        ids = [c.id for c in ordered]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.origin}: duplicate category ids {ids}")
        self._labels = {c.id: label for label, c in enumerate(ordered, start=1)}
        self._labels_key = key

    def _label_map(self) -> dict[int, int]:
        if tuple(self.categories) != self._labels_key:  # categories were edited
            self._refresh_labels()
        return self._labels

    def label_of(self, category_id: int) -> int:
        """Contiguous label (1..K) of a COCO category id."""
        try:
            return self._label_map()[int(category_id)]
        except KeyError:
            raise KeyError(
                f"{self.origin}: unknown category id {category_id}; known ids: {sorted(self._label_map())}"
            ) from None

    def labels_of(self, category_ids: np.ndarray) -> np.ndarray:
        """Contiguous labels (int64) of an array of COCO category ids."""
        mapping = self._label_map()
        try:
            return np.array([mapping[int(c)] for c in np.asarray(category_ids).reshape(-1)], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"{self.origin}: unknown category id {exc.args[0]}; known ids: {sorted(mapping)}") from None

    @property
    def num_classes(self) -> int:
        """Number of object classes K (background excluded)."""
        return len(self.categories)

    @property
    def category_names(self) -> list[str]:
        """Category names in label order: ``category_names[label - 1]``."""
        return [c.name for c in sorted(self.categories, key=lambda c: c.id)]

    @property
    def sorted_categories(self) -> list[Category]:
        """Categories in label order."""
        return sorted(self.categories, key=lambda c: c.id)

    def __len__(self) -> int:
        return len(self.records)

    def to_coco_dict(self) -> dict[str, Any]:
        """A standard COCO ground-truth dict, so any source can be evaluated with COCO tools.

        Ids are preserved; bbox is xywh, area is w*h (no masks here), crowd boxes
        are kept with iscrowd=1 so the evaluator ignores matches against them.
        """
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for rec in self.records:
            images.append(
                {
                    "id": int(rec.image_id),
                    "file_name": rec.file_name,
                    "width": int(rec.width),
                    "height": int(rec.height),
                }
            )
            for box, cat, crowd, ann_id in zip(
                rec.boxes.tolist(),
                rec.category_ids.tolist(),
                rec.iscrowd.tolist(),
                rec.annotation_ids.tolist(),
                strict=True,
            ):
                x1, y1, x2, y2 = box
                w, h = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": int(ann_id),
                        "image_id": int(rec.image_id),
                        "category_id": int(cat),
                        "bbox": [x1, y1, w, h],
                        "area": w * h,
                        "iscrowd": int(bool(crowd)),
                    }
                )
        categories = [{"id": int(c.id), "name": c.name, "supercategory": ""} for c in self.sorted_categories]
        return {
            "info": {"description": f"detkd ground truth from {self.origin}"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
