"""Every augmentation on real photographs: each box that survives still covers its object.

The real-photo set pastes each object so that it fills its box exactly, so a twin image with every
object's box painted in its own colour follows the object through the geometry. The twin goes through
the same random draws (same seed, photometric distortion left out: it is the last op and moves no box),
and each surviving box must equal the extent of its colour there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from realphotos import write_real_photo_set

from detkd.config import InputConfig
from detkd.data import load_coco
from detkd.data.augment import reference_transform
from detkd.data.dataset import DetectionDataset
from detkd.data.transforms import to_tensor

COLOURS = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [1, 0.5, 0]], dtype=torch.float32
)
AUGMENTS = {
    "hflip": {"hflip": 1.0},
    "short_side_jitter": {"scale_jitter": {"short_side": [96, 160]}},
    "large_scale_jitter": {"scale_jitter": {"ratio": [0.5, 1.8]}},
    "zoom_out": {"zoom_out": {"p": 1.0, "max_ratio": 2.5}},
    "iou_crop": {"iou_crop": {"p": 1.0}},
    "photometric": {"photometric": {"p": 1.0}},
    "everything": {
        "hflip": 0.5,
        "zoom_out": {"p": 0.5, "max_ratio": 2.0},
        "iou_crop": {"p": 0.7},
        "scale_jitter": {"short_side": [96, 160]},
        "photometric": {"p": 0.5},
    },
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    files = write_real_photo_set(root, train=10, val=0, test=0, max_objects=3, seed=4)
    return DetectionDataset(load_coco(files["train"], root / "images" / "train"), train=False)


def _twin(record, height: int, width: int) -> torch.Tensor:
    """Black image with box k painted in COLOURS[k]."""
    twin = torch.zeros(3, height, width)
    for k, (x1, y1, x2, y2) in enumerate(record.boxes.astype(int)):
        twin[:, y1:y2, x1:x2] = COLOURS[k].view(3, 1, 1)
    return twin


def _extent(image: torch.Tensor, colour: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Bounding box of the pixels of one colour (interpolated edge pixels excluded)."""
    close = (image - colour.view(3, 1, 1)).abs().amax(dim=0) < 0.16
    if not close.any():
        return None
    ys, xs = torch.nonzero(close, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("name", list(AUGMENTS))
def test_every_surviving_box_covers_its_object(photos, name):
    spec = InputConfig(size=128, max_size=224, augment=AUGMENTS[name])
    geometry = InputConfig(
        size=128, max_size=224, augment={k: v for k, v in AUGMENTS[name].items() if k != "photometric"}
    )
    transform, twin_transform = reference_transform(spec), reference_transform(geometry)
    checked = 0
    for index in range(len(photos)):
        record = photos.source.records[index]
        image = to_tensor(photos._decode(record))
        target = dict(photos.target_of(record))
        target["labels"] = torch.arange(1, len(target["boxes"]) + 1)  # label k + 1 = object k: follows its box
        for seed in range(3):
            torch.manual_seed(seed)
            out, out_target = transform(image, target)
            torch.manual_seed(seed)
            twin, twin_target = twin_transform(_twin(record, *image.shape[-2:]), target)
            assert out.shape == twin.shape
            assert torch.equal(out_target["boxes"], twin_target["boxes"])
            assert torch.equal(out_target["labels"], twin_target["labels"])
            assert len(out_target["labels"]) == len(out_target["boxes"])
            for box, label in zip(out_target["boxes"], out_target["labels"], strict=True):
                x1, y1, x2, y2 = box.tolist()
                assert 0 <= x1 < x2 <= out.shape[-1] and 0 <= y1 < y2 <= out.shape[-2]
                if min(x2 - x1, y2 - y1) < 4:  # too small for an interior pixel of its own colour
                    continue
                extent = _extent(twin, COLOURS[int(label) - 1])
                assert extent is not None, (name, index, seed, int(label))
                assert np.allclose(extent, box.numpy(), atol=1.5), (name, index, seed, extent, box.tolist())
                checked += 1
    assert checked >= 20
