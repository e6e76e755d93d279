"""Datasets for detkd: COCO JSON and Parquet sources, synthetic shapes, transforms.

Everything downstream works on a :class:`DetectionSource`; :func:`open_source`
picks the reader from what the user points at.
"""

from __future__ import annotations

from pathlib import Path

from detkd.data.coco import load_coco, validate_coco
from detkd.data.dataset import DetectionDataset, collate_detection
from detkd.data.parquet import load_parquet, write_parquet
from detkd.data.records import Category, DatasetError, DetectionSource, ImageRecord, Problem
from detkd.data.synth import SynthSpec, synthesize
from detkd.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortSide,
    ScaleBy,
    hflip,
    resize_short_side,
    scale_batch,
    scale_by,
    to_tensor,
)

__all__ = [
    "Category",
    "Compose",
    "DatasetError",
    "DetectionDataset",
    "DetectionSource",
    "ImageRecord",
    "Problem",
    "RandomHorizontalFlip",
    "ResizeShortSide",
    "ScaleBy",
    "SynthSpec",
    "collate_detection",
    "hflip",
    "load_coco",
    "load_parquet",
    "open_source",
    "resize_short_side",
    "scale_batch",
    "scale_by",
    "synthesize",
    "to_tensor",
    "validate_coco",
    "write_parquet",
]


def open_source(
    *,
    coco: Path | None = None,
    images: Path | None = None,
    parquet: Path | None = None,
    skip_invalid: bool = False,
) -> DetectionSource:
    """Open a dataset given either a COCO file plus its images folder, or Parquet shards.

    ``skip_invalid`` applies to COCO (Parquet shards are written from an
    already validated source).
    """
    if parquet is not None:
        if coco is not None or images is not None:
            raise ValueError("give either coco= and images= (a COCO dataset) or parquet= (Parquet shards), not both")
        return load_parquet(Path(parquet))
    if coco is None and images is None:
        raise ValueError("no dataset given: pass coco= and images= (a COCO dataset) or parquet= (shards)")
    if coco is None or images is None:
        missing = "images= (the folder the file_name entries are relative to)" if coco else "coco= (the JSON file)"
        raise ValueError(f"a COCO dataset needs both coco= and images=; missing {missing}")
    return load_coco(Path(coco), Path(images), skip_invalid=skip_invalid)
