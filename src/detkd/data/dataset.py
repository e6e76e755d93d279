"""A torch Dataset over any :class:`DetectionSource`.

It turns records into the (image, target) pairs torchvision detectors expect,
with contiguous labels. Crowd regions never become training targets (COCO
evaluation reads them from ``source.to_coco_dict()`` instead).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from detkd.data.records import DatasetError, DetectionSource, ImageRecord, Problem, image_record_name
from detkd.data.transforms import MIN_BOX_SIDE, Target, sanitize_boxes, to_tensor

__all__ = ["MIN_BOX_SIDE", "DetectionDataset", "collate_detection"]


class DetectionDataset(Dataset[tuple[torch.Tensor, Target]]):
    """(image, target) pairs: image (3, H, W) float in [0, 1]; target as in ``detkd.data.transforms``.

    Train mode also clips boxes to the image and drops those thinner than ``MIN_BOX_SIDE`` (1 px)
    after the transform, with their labels (``transforms.sanitize_boxes``), so the loss never sees
    degenerate boxes.
    """

    def __init__(
        self,
        source: DetectionSource,
        *,
        transform: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None = None,
        train: bool = True,
    ) -> None:
        self.source = source
        self.transform = transform
        self.train = train

    def __len__(self) -> int:
        return len(self.source.records)

    def _decode(self, record: ImageRecord) -> Image.Image:
        name = image_record_name(record.image_id, record.file_name)
        data = self.source.image_reader(record)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
            raise DatasetError([Problem(self.source.origin, name, f"cannot decode image: {exc}")]) from None
        if image.size != (record.width, record.height):
            raise DatasetError(
                [
                    Problem(
                        self.source.origin,
                        name,
                        f"decoded size {image.size[0]}x{image.size[1]} differs from declared "
                        f"{record.width}x{record.height}",
                    )
                ]
            )
        return image

    def target_of(self, record: ImageRecord) -> Target:
        """The untransformed target of a record: non-crowd boxes with contiguous labels."""
        keep = ~record.iscrowd
        labels = torch.from_numpy(self.source.labels_of(record.category_ids[keep]))
        return {
            "boxes": torch.from_numpy(np.ascontiguousarray(record.boxes[keep], dtype=np.float32)).reshape(-1, 4),
            "labels": labels,
            "image_id": int(record.image_id),
            "orig_size": (int(record.height), int(record.width)),
            "scale": torch.ones(2, dtype=torch.float32),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        record = self.source.records[index]
        image = to_tensor(self._decode(record))
        target = self.target_of(record)
        if self.transform is not None:
            image, target = self.transform(image, target)
        if self.train:
            target = sanitize_boxes(target, height=image.shape[-2], width=image.shape[-1])
        return image, target


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep images and targets as lists: detection images differ in size."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
