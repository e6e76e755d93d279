"""Write any source as a COCO instances JSON, so YOLO and VOC data can go where COCO is expected.

The ``file_name`` of each image stays as the source has it: relative to the folder
its image reader reads from (:func:`images_folder`), which is the ``--images`` folder
to give with the written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from detkd.data.coco import FileImageReader
from detkd.data.records import DetectionSource

__all__ = ["images_folder", "write_coco"]


def images_folder(source: DetectionSource) -> Path | None:
    """The folder a source's file names are relative to; None when its images are not files (Parquet)."""
    reader = source.image_reader
    return Path(reader.root) if isinstance(reader, FileImageReader) else None


def write_coco(source: DetectionSource, path: Path) -> Path:
    """Write ``source`` as a COCO instances JSON at ``path`` (atomically: a temporary file, then a rename).

    Image, annotation and category ids are kept; crowd regions keep ``iscrowd: 1``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(source.to_coco_dict()), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
