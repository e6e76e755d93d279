"""Flat, explicit detector builders on top of torchvision's detection models.

Resizing is done by the data pipeline (so a student's low-resolution view stays
exactly aligned with its teacher's view); the detector's own transform therefore
only normalises and pads. Padding is to a multiple of the coarsest stride, so a
half-resolution model with levels shifted down by one sees feature maps of exactly
the teacher's sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from detkd.models.backbones import PyramidBackbone, build_body

ARCHS = ("fcos", "retinanet", "fasterrcnn")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class NormalizeAndPad(GeneralizedRCNNTransform):
    """torchvision's detection transform minus the resize: normalise, pad, batch."""

    def __init__(self, *, size_divisible: int) -> None:
        super().__init__(
            min_size=1,
            max_size=1 << 16,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            size_divisible=size_divisible,
        )

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


def default_anchor_sizes(arch: str, min_level: int, max_level: int) -> list[list[float]]:
    """Anchor/point sizes proportional to each level's stride (torchvision's ratios)."""
    out = []
    for level in range(min_level, max_level + 1):
        stride = 2**level
        if arch == "fcos":
            out.append([float(stride)])
        elif arch == "retinanet":
            out.append([4.0 * stride * 2 ** (i / 3) for i in range(3)])
        else:
            out.append([8.0 * stride])
    return out


def fcos_head(channels: int, anchors: int, classes: int, *, num_convs: int) -> FCOSHead:
    """torchvision's FCOS head with softplus in front of its ReLU on the box distances.

    A ReLU whose input turns negative at every positive location never recovers (zero
    gradient): measured here, 1 seed in 3 of a small 64 px FCOS ended with its box loss
    stuck at 1.0 and AP 0. relu(softplus(x)) = softplus(x) keeps the distances positive
    with a gradient everywhere; the rest of the head is unchanged.
    """
    head = FCOSHead(channels, anchors, classes, num_convs=num_convs)
    head.regression_head.bbox_reg = nn.Sequential(head.regression_head.bbox_reg, nn.Softplus())
    return head


def _anchor_generator(arch: str, sizes: list[list[float]]) -> AnchorGenerator:
    ratios = (1.0,) if arch == "fcos" else (0.5, 1.0, 2.0)
    return AnchorGenerator(tuple(tuple(s) for s in sizes), (ratios,) * len(sizes))


def build_detector(
    *,
    arch: str,
    backbone: str,
    num_classes: int,
    min_level: int = 3,
    max_level: int = 7,
    fpn_channels: int = 64,
    head_convs: int = 2,
    anchor_sizes: list[list[float]] | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
    detections_per_img: int = 100,
    norm: str = "bn",
    backbone_weights: str | Path | None = None,
    weights: str | Path | None = None,
    multiscale: bool = False,
    low_res_scale: float = 0.5,
    fused_loss_weight: float = 0.4,
) -> nn.Module:
    """Build a detector. ``num_classes`` excludes background (labels are 1..num_classes).

    ``weights`` is a local detkd checkpoint or raw state dict of the whole detector;
    ``backbone_weights`` a local torchvision classification state dict. Nothing is
    ever downloaded. ``multiscale=True`` builds MSAD's aligned multi-scale teacher
    (one-stage archs): the shared network also runs on the input scaled by
    ``low_res_scale`` and predicts from the C-FF fused pyramid.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if arch == "fcos" and fpn_channels % 32:
        raise ValueError(f"fcos heads use GroupNorm(32): fpn_channels must be a multiple of 32, got {fpn_channels}")
    n_levels = max_level - min_level + 1
    sizes = anchor_sizes if anchor_sizes is not None else default_anchor_sizes(arch, min_level, max_level)
    if len(sizes) != n_levels:
        raise ValueError(f"anchor_sizes has {len(sizes)} levels, the pyramid P{min_level}-P{max_level} has {n_levels}")
    config = dict(
        arch=arch,
        backbone=backbone,
        num_classes=num_classes,
        min_level=min_level,
        max_level=max_level,
        fpn_channels=fpn_channels,
        head_convs=head_convs,
        anchor_sizes=[list(map(float, s)) for s in sizes],
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        norm=norm,
        backbone_weights=None,
        weights=None,
        multiscale=multiscale,
        low_res_scale=low_res_scale,
        fused_loss_weight=fused_loss_weight,
    )
    if multiscale:
        model = _build_multiscale(config)
        if weights is not None:
            from detkd.models.checkpoint import load_state_into

            load_state_into(model, Path(weights))
        return model
    body = build_body(backbone, weights=Path(backbone_weights) if backbone_weights else None, norm=norm)
    pyramid = PyramidBackbone(body, min_level=min_level, max_level=max_level, out_channels=fpn_channels)
    anchors = _anchor_generator(arch, sizes)
    n_anchors = anchors.num_anchors_per_location()[0]
    classes = num_classes + 1  # index 0 is background for every arch: one label space everywhere
    common = dict(min_size=1, max_size=1 << 16)
    if arch == "fcos":
        model = FCOS(
            pyramid,
            classes,
            anchor_generator=anchors,
            head=fcos_head(fpn_channels, n_anchors, classes, num_convs=head_convs),
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            **common,
        )
    elif arch == "retinanet":
        head = RetinaNetHead(fpn_channels, n_anchors, classes, norm_layer=lambda c: nn.GroupNorm(min(32, c // 4), c))
        model = RetinaNet(
            pyramid,
            classes,
            anchor_generator=anchors,
            head=head,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            **common,
        )
    else:
        roi_levels = [name for name in pyramid.level_names if int(name[1:]) <= 5]
        model = FasterRCNN(
            pyramid,
            classes,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=2),
            box_score_thresh=score_thresh,
            box_nms_thresh=nms_thresh,
            box_detections_per_img=detections_per_img,
            **common,
        )
    model.transform = NormalizeAndPad(size_divisible=max(32, 2**max_level))
    model.detkd_config = config
    if weights is not None:
        from detkd.models.checkpoint import load_state_into

        load_state_into(model, Path(weights))
    return model


def _build_multiscale(config: dict[str, Any]) -> nn.Module:
    import math

    from detkd.models.multiscale import MultiScaleDetector

    if config["arch"] == "fasterrcnn":
        raise ValueError("the multi-scale (MSAD) teacher needs a one-stage arch (fcos or retinanet)")
    shift = -math.log2(config["low_res_scale"])
    if config["low_res_scale"] >= 1 or abs(shift - round(shift)) > 1e-6:
        raise ValueError(f"low_res_scale must be 1/2**k (0.5, 0.25, ...), got {config['low_res_scale']}")
    low_min = config["min_level"] - int(round(shift))
    if low_min < 2:
        raise ValueError(
            f"min_level {config['min_level']} leaves no level P{low_min} for the low-resolution branch; "
            f"use min_level >= {2 + int(round(shift))}"
        )
    inner_kwargs = {**config, "multiscale": False, "min_level": low_min, "anchor_sizes": None}
    inner = build_detector(**inner_kwargs)
    model = MultiScaleDetector(
        inner,
        min_level=config["min_level"],
        max_level=config["max_level"],
        anchor_sizes=config["anchor_sizes"],
        low_res_scale=config["low_res_scale"],
        fused_loss_weight=config["fused_loss_weight"],
        low_res_transform=NormalizeAndPad(size_divisible=max(32, 2 ** (config["max_level"] - int(round(shift))))),
    )
    model.detkd_config = config
    return model


def pyramid_strides(model: nn.Module) -> dict[str, int]:
    """Level name -> stride in input pixels, e.g. {"p3": 8, ...}."""
    return dict(model.strides) if hasattr(model, "fusions") else dict(model.backbone.strides)


def detector_config(model: nn.Module) -> dict[str, Any]:
    """The keyword arguments that rebuild ``model`` with ``build_detector``."""
    return dict(model.detkd_config)


def set_inference_thresholds(model: nn.Module, *, score_thresh: float, detections_per_img: int) -> None:
    """COCO evaluation wants low score thresholds; deployment wants higher ones."""
    model = getattr(model, "detector", model)  # the multi-scale teacher predicts through its inner detector
    if isinstance(model, FasterRCNN):
        model.roi_heads.score_thresh = score_thresh
        model.roi_heads.detections_per_img = detections_per_img
    else:
        model.score_thresh = score_thresh
        model.detections_per_img = detections_per_img
