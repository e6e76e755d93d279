"""What every dataset reader reports: the summary table of a check, and the load-or-refuse rule.

COCO, YOLO and VOC readers share these so ``detkd data check`` prints the same
table for each format and ``skip_invalid`` means the same thing everywhere.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import numpy as np

from detkd.data.records import Category, DatasetError, DetectionSource, ImageRecord, Problem

__all__ = ["SIZE_BINS", "accept_or_raise", "empty_summary", "summarize"]

logger = logging.getLogger("detkd.data")

# Upper edges of the sqrt(area) bins, in pixels; the last bin is open.
SIZE_BINS: tuple[tuple[str, float], ...] = (
    ("<8", 8.0),
    ("8-16", 16.0),
    ("16-32", 32.0),
    ("32-64", 64.0),
    ("64-128", 128.0),
    (">=128", math.inf),
)


def empty_summary() -> dict[str, Any]:
    return {
        "images": 0,
        "annotations": 0,
        "crowd": 0,
        "categories": [],
        "size_histogram": {name: 0 for name, _ in SIZE_BINS},
        "images_dropped": 0,
        "annotations_dropped": 0,
    }


def summarize(
    records: list[ImageRecord],
    categories: list[Category],
    *,
    images_total: int,
    annotations_total: int,
) -> dict[str, Any]:
    """Counts of what was kept; crowd regions are neither counted as objects nor sized."""
    summary = empty_summary()
    kept = sum(rec.num_annotations for rec in records)
    if kept:
        boxes = np.concatenate([rec.boxes for rec in records]).astype(np.float64)
        cats = np.concatenate([rec.category_ids for rec in records])
        crowd_mask = np.concatenate([rec.iscrowd for rec in records])
    else:
        boxes, cats, crowd_mask = np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, bool)
    objects = ~crowd_mask
    crowd = int(crowd_mask.sum())
    per_category = Counter(cats[objects].tolist())
    sides = np.sqrt((boxes[objects, 2] - boxes[objects, 0]) * (boxes[objects, 3] - boxes[objects, 1]))
    edges = [upper for _, upper in SIZE_BINS[:-1]]
    bin_counts = np.bincount(np.searchsorted(edges, sides, side="right"), minlength=len(SIZE_BINS))
    summary["size_histogram"] = {name: int(n) for (name, _), n in zip(SIZE_BINS, bin_counts, strict=True)}
    summary.update(
        images=len(records),
        annotations=kept,
        crowd=crowd,
        categories=[
            {"id": c.id, "name": c.name, "count": per_category[c.id]} for c in sorted(categories, key=lambda c: c.id)
        ],
        images_dropped=images_total - len(records),
        annotations_dropped=annotations_total - kept,
    )
    return summary


def accept_or_raise(
    source: DetectionSource | None,
    problems: list[Problem],
    summary: dict[str, Any],
    *,
    skip_invalid: bool,
    origin: object,
) -> DetectionSource:
    """A validator's result as a loader returns it: refuse bad data unless asked to skip it.

    Raises :class:`DatasetError` listing every problem unless ``skip_invalid``; with it,
    logs a warning with what was dropped. An unusable dataset (``source`` None) always raises.
    """
    if source is None or (problems and not skip_invalid):
        raise DatasetError(problems)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        logger.warning(
            "%s: skipped invalid data: %d problem(s), %d image(s) and %d annotation(s) dropped; "
            "kept %d image(s) and %d annotation(s)\n%s%s",
            origin,
            len(problems),
            summary["images_dropped"],
            summary["annotations_dropped"],
            summary["images"],
            summary["annotations"],
            shown,
            more,
        )
    return source
