"""Datasets for detkd: COCO, YOLO, Pascal VOC and Parquet sources, synthetic shapes, transforms.

Everything downstream works on a :class:`DetectionSource`; :func:`open_source`
picks the reader from what the user points at.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detkd.data.coco import load_coco, validate_coco
from detkd.data.coco_writer import write_coco
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
from detkd.data.voc import VOC_CLASSES, load_voc, validate_voc, write_voc
from detkd.data.yolo import load_yolo, validate_yolo, write_yolo

__all__ = [
    "Category",
    "Compose",
    "DatasetError",
    "DetectionDataset",
    "DetectionSource",
    "ImageRecord",
    "VOC_CLASSES",
    "Problem",
    "RandomHorizontalFlip",
    "ResizeShortSide",
    "ScaleBy",
    "SynthSpec",
    "collate_detection",
    "hflip",
    "load_coco",
    "load_parquet",
    "load_voc",
    "load_yolo",
    "open_source",
    "resize_short_side",
    "scale_batch",
    "scale_by",
    "synthesize",
    "to_tensor",
    "validate_coco",
    "validate_voc",
    "validate_yolo",
    "write_coco",
    "write_parquet",
    "write_voc",
    "write_yolo",
]


def open_source(
    *,
    coco: Path | None = None,
    images: Path | None = None,
    parquet: Path | None = None,
    yolo: Path | None = None,
    voc: Path | None = None,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
) -> DetectionSource:
    """Open one dataset: ``coco=`` + ``images=``, ``parquet=``, ``yolo=`` (a data.yaml) + ``split=``,
    or ``voc=`` (a VOC folder) + ``split=`` (and optional ``classes=``).

    ``skip_invalid`` applies to COCO, YOLO and VOC (Parquet shards are written from an
    already validated source).
    """
    given = [
        name
        for name, present in (
            ("coco=/images=", coco is not None or images is not None),
            ("parquet=", parquet is not None),
            ("yolo=", yolo is not None),
            ("voc=", voc is not None),
        )
        if present
    ]
    if not given:
        raise ValueError(
            "no dataset given: pass coco= and images= (a COCO dataset), parquet= (shards), "
            "yolo= and split= (a YOLO data.yaml) or voc= and split= (a Pascal VOC folder)"
        )
    if len(given) > 1:
        raise ValueError(f"give one dataset, not both {' and '.join(given)}")
    if split is not None and yolo is None and voc is None:
        raise ValueError("split= picks a split of a YOLO or VOC dataset; give yolo= or voc=")
    if classes is not None and voc is None:
        raise ValueError("classes= names the classes of a VOC dataset; give voc=")
    if parquet is not None:
        return load_parquet(Path(parquet))
    if yolo is not None or voc is not None:
        if split is None:
            raise ValueError(f"a {'YOLO' if yolo is not None else 'VOC'} dataset needs split= (which split to read)")
        if yolo is not None:
            return load_yolo(Path(yolo), split, skip_invalid=skip_invalid)
        return load_voc(Path(voc), split, classes=classes, skip_invalid=skip_invalid)
    if coco is None or images is None:
        missing = "images= (the folder the file_name entries are relative to)" if coco else "coco= (the JSON file)"
        raise ValueError(f"a COCO dataset needs both coco= and images=; missing {missing}")
    return load_coco(Path(coco), Path(images), skip_invalid=skip_invalid)
