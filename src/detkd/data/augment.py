"""Box-aware training augmentation of the reference view (``input.augment``); evaluation never augments.

Order, per sample: zoom-out and IoU crop on the decoded image (as in torchvision's SSD recipe: they
change how much of the image an object covers, and the resize that follows sets its pixel size), then
the reference sizing (``input.size``, a short-side jitter, or large-scale jitter onto a fixed canvas),
then the flip, then the photometric distortion (pixels only, so it moves no box; on the reference view
it costs least). A distilled student's view is derived from this one augmented view by the distiller
(``scale_batch``), a plain student's by ``ScaleBy`` after it: teacher and student always see the same
augmented image.

torchvision.transforms.v2 does the zoom-out, the IoU crop, the canvas crop/pad and the photometric
distortion, on ``tv_tensors``; the sizing and the flip are ``detkd.data.transforms``' (its docstring says
why). Boxes stay paired with their labels (and every ``PER_BOX_KEYS`` field): after a crop they are
clipped to the image and those under ``MIN_BOX_SIDE`` a side are dropped (``sanitize_boxes``, the rule
the dataset applies to every training sample at the end). An op that crops or pads records no offset:
``target["scale"]`` stays the product of the resize ratios, an exact map back to original pixels only
for views without crop, pad or flip (evaluation's).

Randomness comes from torch's global RNG only (v2 draws from it too): seed torch to reproduce a sample.
DataLoader workers get their torch seeds from the main process's RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from detkd.config import (
    InputConfig,
    IoUCropConfig,
    PhotometricConfig,
    ScaleJitterConfig,
    ZoomOutConfig,
)
from detkd.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortSide,
    Target,
    Transform,
    resize_short_side,
    sanitize_boxes,
    scale_by,
    short_side_ratio,
)

__all__ = [
    "RandomIoUCrop",
    "RandomPhotometricDistort",
    "RandomShortSide",
    "RandomZoomOut",
    "ScaleJitterCanvas",
    "reference_transform",
    "sizing_transform",
]


def _wrap(image: torch.Tensor, target: Target) -> tuple[tv_tensors.Image, tv_tensors.BoundingBoxes]:
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    canvas = (int(image.shape[-2]), int(image.shape[-1]))
    return tv_tensors.Image(image), tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas)


def _unwrap(image: torch.Tensor, boxes: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    out = dict(target)
    out["boxes"] = boxes.as_subclass(torch.Tensor)
    return image.as_subclass(torch.Tensor), out


class RandomZoomOut:
    """torchvision's RandomZoomOut: the image at a random place on a canvas ``r`` times its size, r in [1, max_ratio].

    Boxes move with the image and none leaves it, so none is dropped here.
    """

    def __init__(self, *, p: float, max_ratio: float, fill: Sequence[float]) -> None:
        self.op = v2.RandomZoomOut(fill=list(fill), side_range=(1.0, max_ratio), p=p)

    @classmethod
    def from_config(cls, cfg: ZoomOutConfig) -> RandomZoomOut:
        return cls(p=cfg.p, max_ratio=cfg.max_ratio, fill=cfg.fill)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        out_image, boxes = self.op(*_wrap(image, target))
        return _unwrap(out_image, boxes, target)

    def __repr__(self) -> str:
        return f"RandomZoomOut(p={self.op.p}, side_range={self.op.side_range}, fill={self.op.fill})"


class RandomIoUCrop:
    """With probability ``p``, torchvision's RandomIoUCrop (SSD), then :func:`sanitize_boxes`.

    A box whose centre falls outside the crop is dropped (torchvision zeroes it), the others are
    clipped to the crop; an image without boxes is left as it is (no crop could satisfy an option).
    """

    def __init__(
        self,
        *,
        p: float = 1.0,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        sampler_options: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
        trials: int = 40,
    ) -> None:
        if 1.0 not in sampler_options:
            raise ValueError("sampler_options must include 1.0, or RandomIoUCrop may retry forever")
        self.p = p
        self.op = v2.RandomIoUCrop(
            min_scale=min_scale,
            max_scale=max_scale,
            min_aspect_ratio=min_aspect_ratio,
            max_aspect_ratio=max_aspect_ratio,
            sampler_options=list(sampler_options),
            trials=trials,
        )

    @classmethod
    def from_config(cls, cfg: IoUCropConfig) -> RandomIoUCrop:
        return cls(**cfg.model_dump())

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()).item() >= self.p or torch.as_tensor(target["boxes"]).numel() == 0:
            return image, dict(target)
        out_image, boxes = self.op(*_wrap(image, target))
        out_image, out = _unwrap(out_image, boxes, target)
        return out_image, sanitize_boxes(out, height=out_image.shape[-2], width=out_image.shape[-1])

    def __repr__(self) -> str:
        return f"RandomIoUCrop(p={self.p}, options={self.op.options}, trials={self.op.trials})"


class RandomPhotometricDistort:
    """torchvision's RandomPhotometricDistort (brightness, contrast, saturation, hue, channel order); boxes stay."""

    def __init__(
        self,
        *,
        p: float,
        brightness: Sequence[float],
        contrast: Sequence[float],
        saturation: Sequence[float],
        hue: Sequence[float],
    ) -> None:
        self.op = v2.RandomPhotometricDistort(
            brightness=tuple(brightness), contrast=tuple(contrast), saturation=tuple(saturation), hue=tuple(hue), p=p
        )

    @classmethod
    def from_config(cls, cfg: PhotometricConfig) -> RandomPhotometricDistort:
        return cls(**cfg.model_dump())

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        return self.op(image), dict(target)

    def __repr__(self) -> str:
        return f"RandomPhotometricDistort(p={self.op.p})"


class RandomShortSide:
    """Short side drawn uniformly from ``[min_side, max_side]`` (integers, both included), long side capped at
    ``max_size``: torchvision's RandomShortestSize over that range, with ``resize_short_side``'s rounding."""

    def __init__(self, min_side: int, max_side: int, max_size: int | None = None) -> None:
        if not 1 <= min_side <= max_side:
            raise ValueError(f"need 1 <= min_side <= max_side, got [{min_side}, {max_side}]")
        self.min_side, self.max_side, self.max_size = min_side, max_side, max_size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        size = int(torch.randint(self.min_side, self.max_side + 1, ()).item())
        return resize_short_side(image, target, size=size, max_size=self.max_size)

    def __repr__(self) -> str:
        return f"RandomShortSide([{self.min_side}, {self.max_side}], max_size={self.max_size})"


class ScaleJitterCanvas:
    """Large-scale jitter onto a fixed ``canvas`` x ``canvas`` image (torchvision's ScaleJitter + FixedSizeCrop).

    The image is resized by ``r`` times the reference view's factor (short side ``size``, long side
    capped at ``max_size``), r uniform in ``ratio``; a random window of at most the canvas is kept
    and the rest of the canvas (bottom and right) is filled with ``fill``. Boxes are clipped to the
    window; those left under 1 px a side are dropped with their labels.
    """

    def __init__(
        self, *, ratio: tuple[float, float], size: int, max_size: int | None, canvas: int, fill: Sequence[float]
    ) -> None:
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < lo <= hi, got ratio {ratio}")
        self.ratio, self.size, self.max_size, self.canvas, self.fill = ratio, size, max_size, canvas, list(fill)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        lo, hi = self.ratio
        r = lo + torch.rand(()).item() * (hi - lo)
        factor = r * short_side_ratio(*image.shape[-2:], size=self.size, max_size=self.max_size)
        image, target = scale_by(image, target, factor=factor)  # our rounding and scale record
        h, w = image.shape[-2:]
        crop_h, crop_w = min(h, self.canvas), min(w, self.canvas)
        top = int(torch.randint(0, h - crop_h + 1, ()).item())
        left = int(torch.randint(0, w - crop_w + 1, ()).item())
        tv_image, boxes = _wrap(image, target)
        tv_image = TF.crop(tv_image, top=top, left=left, height=crop_h, width=crop_w)
        boxes = TF.crop(boxes, top=top, left=left, height=crop_h, width=crop_w)
        padding = [0, 0, self.canvas - crop_w, self.canvas - crop_h]  # left, top, right, bottom
        if any(padding):
            tv_image = TF.pad(tv_image, padding=padding, fill=self.fill)
            boxes = TF.pad(boxes, padding=padding)
        out_image, out = _unwrap(tv_image, boxes, target)
        return out_image, sanitize_boxes(out, height=self.canvas, width=self.canvas)

    def __repr__(self) -> str:
        return f"ScaleJitterCanvas(ratio={list(self.ratio)}, size={self.size}, canvas={self.canvas})"


def sizing_transform(jitter: ScaleJitterConfig | None, *, size: int, max_size: int | None) -> Transform:
    """The reference view's size: ``input.size``, or the configured jitter."""
    if jitter is None:
        return ResizeShortSide(size, max_size)
    if jitter.short_side is not None:
        return RandomShortSide(*jitter.short_side, max_size=max_size)
    assert jitter.ratio is not None  # the config allows exactly one
    return ScaleJitterCanvas(ratio=jitter.ratio, size=size, max_size=max_size, canvas=size, fill=jitter.fill)


def reference_transform(spec: InputConfig) -> Compose:
    """The training reference view of ``input``: augmentation in the order of this module's docstring.

    With the default ``input.augment`` (flip only) this is ResizeShortSide + RandomHorizontalFlip,
    the training view detkd had before ``input.augment`` existed.
    """
    augment = spec.augment
    steps: list[Transform] = []
    if augment.zoom_out is not None:
        steps.append(RandomZoomOut.from_config(augment.zoom_out))
    if augment.iou_crop is not None:
        steps.append(RandomIoUCrop.from_config(augment.iou_crop))
    steps.append(sizing_transform(augment.scale_jitter, size=spec.size, max_size=spec.max_size))
    if augment.hflip > 0:
        steps.append(RandomHorizontalFlip(augment.hflip))
    if augment.photometric is not None:
        steps.append(RandomPhotometricDistort.from_config(augment.photometric))
    return Compose(steps)
