"""Image + box transforms on tensors, with exact bookkeeping of the scale.

Distillation compares a teacher's view of a sample with a student's
half-resolution view of the SAME augmented sample, and evaluation maps
predictions back to original pixels. Both need the geometry to be exact, so
every resize records its actual per-axis ratio in ``target["scale"]``
(current coords = original coords * scale; a crop or pad in training
augmentation adds an offset that is not recorded) and nothing here is random
except the explicit Random* classes, which use torch's global RNG.

Targets are never mutated: every function returns a new dict.

What is torchvision.transforms.v2 and what is ours. The training augmentation
(``detkd.data.augment``) uses v2 for what only moves or recolours pixels and boxes:
zoom-out, IoU crop, the large-scale-jitter canvas crop/pad and the photometric
distortion. Every resize is ours (here), and so is the flip, for a measured reason
(benchmarks/results/transforms.md): torchvision sizes a short-side resize by
truncating the long side where we round (another output size for 43 % of the
shapes tried, so a training view would differ from the evaluation view and the
deployed one) and refuses ``max_size == size``; it records no scale. So the sizing
and the bookkeeping stay ours either way, and what torchvision would replace is one
``F.interpolate`` call (its resize kernel calls the same one: bit-identical output),
one multiply and one flip. Its kernels were as fast as this code and its
``tv_tensors`` path about 1.3x slower, per sample and per ``scale_batch`` of 16:
nothing to gain, and the default training view (resize + flip) stays free of
``tv_tensors`` wrapping.

Dropping boxes has one rule, :func:`sanitize_boxes` (clip, then drop boxes under
``MIN_BOX_SIDE`` a side with their per-box fields): torchvision's
ClampBoundingBoxes + SanitizeBoundingBoxes on XYXY boxes, for targets that are
plain dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from detkd.records import InputSpec

__all__ = [
    "MIN_BOX_SIDE",
    "PER_BOX_KEYS",
    "Compose",
    "RandomHorizontalFlip",
    "ResizeShortSide",
    "ScaleBy",
    "Target",
    "Transform",
    "hflip",
    "resize_image",
    "resize_short_side",
    "sanitize_boxes",
    "scale_batch",
    "scale_by",
    "scaled_size",
    "short_side_ratio",
    "short_side_size",
    "to_tensor",
]

Target = dict[str, Any]

MIN_BOX_SIDE = 1.0  # px; training views drop thinner boxes (sanitize_boxes)
# Target entries with one row per box: filtered together with "boxes" whenever boxes are dropped.
PER_BOX_KEYS = ("labels", "iscrowd")
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


def _scale_of(target: Target) -> torch.Tensor:
    scale = target.get("scale")
    if scale is None:
        return torch.ones(2, dtype=torch.float32)
    return torch.as_tensor(scale, dtype=torch.float32)


def resize_image(image: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """The one resize of every view (training, evaluation, deployment): antialiased bilinear, as PIL's."""
    return F.interpolate(
        image.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False, antialias=True
    ).squeeze(0)


def short_side_ratio(height: int, width: int, *, size: int, max_size: int | None = None) -> float:
    """The factor that makes the short side ``size``, unless that makes the long side exceed ``max_size``."""
    ratio = size / min(height, width)
    if max_size is not None and max(height, width) * ratio > max_size:
        ratio = max_size / max(height, width)
    return ratio


def short_side_size(height: int, width: int, *, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(height, width) with the short side ``size``, unless that makes the long side exceed ``max_size``."""
    ratio = short_side_ratio(height, width, size=size, max_size=max_size)
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def scaled_size(height: int, width: int, *, factor: float) -> tuple[int, int]:
    """(round(height * factor), round(width * factor)), at least 1 pixel each."""
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    return max(1, round(height * factor)), max(1, round(width * factor))


def _resize_to(image: torch.Tensor, target: Target, *, height: int, width: int) -> tuple[torch.Tensor, Target]:
    """Resize to exactly (height, width); boxes and scale follow the actual per-axis ratios."""
    h, w = image.shape[-2:]
    if (height, width) == (h, w):
        resized = image.clone()
    else:
        resized = resize_image(image, height=height, width=width)
    out = dict(target)
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    # one 4-vector (x, y, x, y): Tensor.repeat costs more than the multiply on small inputs
    ratio = torch.tensor([width / w, height / h, width / w, height / h], dtype=torch.float32, device=boxes.device)
    out["boxes"] = boxes * ratio
    out["scale"] = _scale_of(target).to(boxes.device) * ratio[:2]
    return resized, out


def resize_short_side(
    image: torch.Tensor, target: Target, *, size: int, max_size: int | None = None
) -> tuple[torch.Tensor, Target]:
    """Resize so the short side is ``size``, unless that makes the long side exceed ``max_size``."""
    height, width = short_side_size(*image.shape[-2:], size=size, max_size=max_size)
    return _resize_to(image, target, height=height, width=width)


def scale_by(image: torch.Tensor, target: Target, *, factor: float) -> tuple[torch.Tensor, Target]:
    """Rescale to (round(h * factor), round(w * factor)); how a student view is derived."""
    height, width = scaled_size(*image.shape[-2:], factor=factor)
    return _resize_to(image, target, height=height, width=width)


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror left-right; box x becomes W - x (x1 and x2 swap)."""
    w = image.shape[-1]
    out = dict(target)
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    out["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    return image.flip(-1), out


def sanitize_boxes(target: Target, *, height: int, width: int) -> Target:
    """Clip boxes to the image and drop those under ``MIN_BOX_SIDE`` a side, with their per-box fields.

    The one rule for every training view (the dataset applies it last; the augmentation after a
    crop). It equals torchvision's ``ClampBoundingBoxes`` + ``SanitizeBoundingBoxes(min_size=1,
    min_area=1)`` on XYXY boxes.
    """
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4).clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE)
    out = dict(target)
    out["boxes"] = boxes[keep]
    for key in PER_BOX_KEYS:
        if key in target:
            out[key] = torch.as_tensor(target[key])[keep]
    return out


def scale_batch(
    images: list[torch.Tensor], targets: list[Target], *, factor: float
) -> tuple[list[torch.Tensor], list[Target]]:
    """``scale_by`` for each sample of a batch: new images and new target dicts."""
    if len(images) != len(targets):
        raise ValueError(f"got {len(images)} images and {len(targets)} targets")
    pairs = [scale_by(image, target, factor=factor) for image, target in zip(images, targets, strict=True)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def to_tensor(pil_image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from any PIL image (grayscale, RGBA, palette, 16-bit)."""
    image = pil_image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: PIL's RGB conversion clips, so rescale to 8 bit ourselves.
        arr = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")  # palette transparency converts cleanly via RGBA
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.array(image, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div_(255.0)


class ResizeShortSide:
    """Transform form of :func:`resize_short_side`."""

    def __init__(self, size: int, max_size: int | None = None) -> None:
        self.size = size
        self.max_size = max_size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        return resize_short_side(image, target, size=self.size, max_size=self.max_size)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return short_side_size(height, width, size=self.size, max_size=self.max_size)

    def __repr__(self) -> str:
        return f"ResizeShortSide(size={self.size}, max_size={self.max_size})"


class ScaleBy:
    """Transform form of :func:`scale_by`."""

    def __init__(self, factor: float) -> None:
        if factor <= 0:
            raise ValueError(f"factor must be positive, got {factor}")
        self.factor = factor

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        return scale_by(image, target, factor=self.factor)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return scaled_size(height, width, factor=self.factor)

    def __repr__(self) -> str:
        return f"ScaleBy(factor={self.factor})"


class RandomHorizontalFlip:
    """Flip with probability ``p``, drawn from torch's global RNG (seed torch to reproduce)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, dict(target)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def eval_transform(spec: InputSpec) -> Compose:
    """The one evaluation view of a model: used by the Ray worker's ``val/AP`` and by ``detkd evaluate``."""
    steps = [ResizeShortSide(spec.size, spec.max_size)]
    if spec.scale != 1.0:
        steps.append(ScaleBy(spec.scale))
    return Compose(steps)
