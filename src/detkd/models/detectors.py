"""One builder per architecture (torchvision style) on top of torchvision's detection models.

Resizing is done by the data pipeline (so a student's low-resolution view stays
exactly aligned with its teacher's view); the detector's own transform therefore
only normalises and pads. Padding is to a multiple of the coarsest stride, so a
half-resolution model with levels shifted down by one sees feature maps of exactly
the teacher's sizes. Builders never load weights: ``detkd.models.checkpoint`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from detkd.config import NETWORK_KEYS, ModelConfig, format_validation_error
from detkd.models.backbones import PyramidBackbone, build_pyramid_backbone, freeze_body
from detkd.models.hf_detector import HFDetector, build_hf_detector, read_hf_config
from detkd.models.lite import DESIGNS, LiteFCOSHead, make_fpn_separable
from detkd.models.mmdet_detector import MMDetDetector, build_mmdet_detector, read_mmdet_config
from detkd.models.multiscale import MultiScaleDetector, level_shift
from detkd.models.vit_teacher import ViTFeatureTeacher, build_vit_teacher

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_TORCHVISION_SIZES = dict(min_size=1, max_size=1 << 16)  # replaced by NormalizeAndPad right after construction


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

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:  # typed for TorchScript
        return result


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, else ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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


def head_norm_groups(channels: int) -> int:
    """GroupNorm groups in an FCOS head: torchvision's 32 from 64 channels up, two channels per group below.

    torchvision's GroupNorm(32) on a 32-channel head has one channel per group, so a 1x1 top
    level normalises a single value, which torch refuses for a lone image: a narrow student
    could not predict one small image. Two channels per group keeps every level valid.
    """
    groups = min(32, channels // 2)
    if groups < 1 or channels % groups:
        raise ValueError(
            f"fcos heads use GroupNorm({max(groups, 1)}) over fpn_channels={channels}: "
            "fpn_channels must be even below 64 and a multiple of 32 from 64 up"
        )
    return groups


class GroupNormFCOSHead(FCOSHead):
    """torchvision's FCOS head with the GroupNorm group count as a parameter (torchvision fixes 32).

    Builds the same two branches in the same order as ``FCOSHead.__init__``, so seeded weights
    are unchanged where the group count is torchvision's.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *, num_convs: int, groups: int) -> None:
        nn.Module.__init__(self)
        norm = partial(nn.GroupNorm, groups)
        self.num_classes = num_classes  # as LiteFCOSHead: the export graph reads it from either head
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(
            in_channels, num_anchors, num_classes, num_convs, norm_layer=norm
        )
        self.regression_head = FCOSRegressionHead(in_channels, num_anchors, num_convs, norm_layer=norm)

    def level_outputs(self, x: list[Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per level, maps (N, A*K, H, W) class logits, (N, A*4, H, W) box distances, (N, A, H, W) centerness:
        what ``forward`` computes, before torchvision flattens and concatenates the levels."""
        classification, regression = self.classification_head, self.regression_head
        out: list[tuple[Tensor, Tensor, Tensor]] = []
        for features in x:
            boxes = regression.conv(features)
            out.append(
                (
                    classification.cls_logits(classification.conv(features)),
                    nn.functional.relu(regression.bbox_reg(boxes)),
                    regression.bbox_ctrness(boxes),
                )
            )
        return out

    def class_logits(self, x: list[Tensor]) -> Tensor:
        """(N, sum HWA, K) class logits alone (what a teacher's logit distillation reads)."""
        return self.classification_head(x)


FCOS_BOX_ACTIVATIONS = ("softplus", "relu")


def fcos_head(
    channels: int, anchors: int, classes: int, *, num_convs: int, box_activation: str = "softplus"
) -> GroupNormFCOSHead:
    """An FCOS head (groups from :func:`head_norm_groups`); ``box_activation`` says what keeps the box distances
    positive.

    ``"softplus"`` (detkd's default) puts a softplus in front of FCOS's ReLU: a ReLU whose input
    turns negative at every positive location never recovers (zero gradient): measured here, 1
    seed in 3 of a small 64 px FCOS ended with its box loss stuck at 1.0 and AP 0.
    relu(softplus(x)) = softplus(x) keeps the distances positive with a gradient everywhere.
    ``"relu"`` is torchvision's own head (``bbox_reg`` a bare conv), which its published files need
    for identical detections.
    """
    if box_activation not in FCOS_BOX_ACTIVATIONS:
        raise ValueError(f"fcos_box_activation must be one of {FCOS_BOX_ACTIVATIONS}, got {box_activation!r}")
    head = GroupNormFCOSHead(channels, anchors, classes, num_convs=num_convs, groups=head_norm_groups(channels))
    if box_activation == "softplus":
        head.regression_head.bbox_reg = nn.Sequential(head.regression_head.bbox_reg, nn.Softplus())
    return head


def _anchors(
    arch: str, sizes: list[list[float]] | None, *, min_level: int, max_level: int, ratios: tuple[float, ...]
) -> AnchorGenerator:
    sizes = sizes if sizes is not None else default_anchor_sizes(arch, min_level, max_level)
    _check_anchor_levels(sizes, min_level=min_level, max_level=max_level)
    return AnchorGenerator(tuple(tuple(float(v) for v in s) for s in sizes), (ratios,) * len(sizes))


def _check_anchor_levels(sizes: list[list[float]], *, min_level: int, max_level: int) -> None:
    n_levels = max_level - min_level + 1
    if len(sizes) != n_levels:
        raise ValueError(f"anchor_sizes has {len(sizes)} levels, the pyramid P{min_level}-P{max_level} has {n_levels}")


def _check_classes(num_classes: int) -> int:
    """Index 0 is background for every arch (one label space everywhere): K + 1 outputs."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return num_classes + 1


def build_fcos(
    *,
    backbone: str,
    num_classes: int,
    min_level: int,
    max_level: int,
    fpn_channels: int,
    head_convs: int,
    anchor_sizes: list[list[float]] | None,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    norm: str,
    norm_eps: float | None,
    top_levels: str,
    fpn_norm: str,
    fcos_box_activation: str,
    design: str,
) -> FCOS:
    """FCOS (one point per location). ``num_classes`` excludes background (labels are 1..num_classes).

    ``design="lite"`` is the CPU-deployment student of :mod:`detkd.models.lite`: separable FPN
    output convs and a shared separable head tower with per-level BatchNorm. Defaults and
    docs of every argument: :class:`~detkd.config.ModelConfig` (:func:`fcos_from_config`).
    """
    if design not in DESIGNS:
        raise ValueError(f"unknown FCOS design {design!r}; choose from {DESIGNS}")
    classes = _check_classes(num_classes)
    if design == "standard":
        head_norm_groups(fpn_channels)  # refuse a width the head cannot normalise before building anything
    elif fcos_box_activation != "softplus" or fpn_norm != "none":
        raise ValueError("design lite has its own separable FPN and softplus head")
    pyramid = build_pyramid_backbone(
        backbone=backbone,
        min_level=min_level,
        max_level=max_level,
        fpn_channels=fpn_channels,
        norm=norm,
        norm_eps=norm_eps,
        top_levels=top_levels,
        fpn_norm=fpn_norm,
    )
    anchors = _anchors("fcos", anchor_sizes, min_level=min_level, max_level=max_level, ratios=(1.0,))
    num_anchors = anchors.num_anchors_per_location()[0]
    if design == "lite":
        make_fpn_separable(pyramid.fpn)
        head: FCOSHead = LiteFCOSHead(
            fpn_channels, num_anchors, classes, num_convs=head_convs, num_levels=max_level - min_level + 1
        )
    else:
        head = fcos_head(fpn_channels, num_anchors, classes, num_convs=head_convs, box_activation=fcos_box_activation)
    model = FCOS(
        pyramid,
        classes,
        anchor_generator=anchors,
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        **_TORCHVISION_SIZES,
    )
    model.transform = NormalizeAndPad(size_divisible=max(32, 2**max_level))
    return model


def fcos_from_config(cfg: ModelConfig, *, num_classes: int) -> FCOS:
    return build_fcos(
        backbone=cfg.backbone,
        num_classes=num_classes,
        min_level=cfg.min_level,
        max_level=cfg.max_level,
        fpn_channels=cfg.fpn_channels,
        head_convs=cfg.head_convs,
        anchor_sizes=cfg.anchor_sizes,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
        norm=cfg.norm,
        norm_eps=cfg.norm_eps,
        top_levels=cfg.top_levels,
        fpn_norm=cfg.fpn_norm,
        fcos_box_activation=cfg.fcos_box_activation,
        design=cfg.design,
    )


RETINANET_HEAD_NORMS = ("gn", "none")
RETINANET_BOX_LOSSES = ("l1", "giou")


def build_retinanet(
    *,
    backbone: str,
    num_classes: int,
    min_level: int,
    max_level: int,
    fpn_channels: int,
    anchor_sizes: list[list[float]] | None,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    norm: str,
    norm_eps: float | None,
    top_levels: str,
    fpn_norm: str,
    head_norm: str,
    box_loss: str,
) -> RetinaNet:
    """RetinaNet (9 anchors per location); torchvision's head (4 convs per branch) with GroupNorm
    (``head_norm="gn"``, as torchvision's v2) or without (``"none"``: conv + bias, as its v1)."""
    classes = _check_classes(num_classes)
    if head_norm not in RETINANET_HEAD_NORMS:
        raise ValueError(f"head_norm must be one of {RETINANET_HEAD_NORMS}, got {head_norm!r}")
    if box_loss not in RETINANET_BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {RETINANET_BOX_LOSSES}, got {box_loss!r}")
    norm_layer = None
    if head_norm == "gn":
        groups = min(32, fpn_channels // 4)
        if groups < 1 or fpn_channels % groups:
            raise ValueError(f"retinanet heads use GroupNorm({groups}): fpn_channels={fpn_channels} does not divide")
        norm_layer = partial(nn.GroupNorm, groups)
    pyramid = build_pyramid_backbone(
        backbone=backbone,
        min_level=min_level,
        max_level=max_level,
        fpn_channels=fpn_channels,
        norm=norm,
        norm_eps=norm_eps,
        top_levels=top_levels,
        fpn_norm=fpn_norm,
    )
    anchors = _anchors("retinanet", anchor_sizes, min_level=min_level, max_level=max_level, ratios=(0.5, 1.0, 2.0))
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], classes, norm_layer=norm_layer)
    head.regression_head._loss_type = box_loss  # what torchvision's retinanet_resnet50_fpn_v2 sets for "giou"
    model = RetinaNet(
        pyramid,
        classes,
        anchor_generator=anchors,
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        **_TORCHVISION_SIZES,
    )
    model.transform = NormalizeAndPad(size_divisible=max(32, 2**max_level))
    return model


def retinanet_from_config(cfg: ModelConfig, *, num_classes: int) -> RetinaNet:
    return build_retinanet(
        backbone=cfg.backbone,
        num_classes=num_classes,
        min_level=cfg.min_level,
        max_level=cfg.max_level,
        fpn_channels=cfg.fpn_channels,
        anchor_sizes=cfg.anchor_sizes,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
        norm=cfg.norm,
        norm_eps=cfg.norm_eps,
        top_levels=cfg.top_levels,
        fpn_norm=cfg.fpn_norm,
        head_norm=cfg.head_norm,
        box_loss=cfg.box_loss,
    )


FASTERRCNN_BOX_HEADS = ("mlp", "conv")


def build_fasterrcnn(
    *,
    backbone: str,
    num_classes: int,
    min_level: int,
    max_level: int,
    fpn_channels: int,
    anchor_sizes: list[list[float]] | None,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    norm: str,
    norm_eps: float | None,
    top_levels: str,
    fpn_norm: str,
    rpn_convs: int,
    box_head: str,
) -> FasterRCNN:
    """Faster R-CNN; RoIs are pooled from the levels up to P5 (P6/P7 only feed the RPN).

    ``rpn_convs`` 3x3 convs in the RPN head (torchvision's v1: 1, v2: 2); ``box_head="mlp"`` is
    torchvision's ``TwoMLPHead`` (v1), ``"conv"`` its ``FastRCNNConvFCHead`` of four 3x3 convs with
    BatchNorm and one 1024-wide fc layer (v2).
    """
    classes = _check_classes(num_classes)
    if box_head not in FASTERRCNN_BOX_HEADS:
        raise ValueError(f"box_head must be one of {FASTERRCNN_BOX_HEADS}, got {box_head!r}")
    if rpn_convs < 1:
        raise ValueError(f"rpn_convs must be >= 1, got {rpn_convs}")
    pyramid = build_pyramid_backbone(
        backbone=backbone,
        min_level=min_level,
        max_level=max_level,
        fpn_channels=fpn_channels,
        norm=norm,
        norm_eps=norm_eps,
        top_levels=top_levels,
        fpn_norm=fpn_norm,
    )
    anchors = _anchors("fasterrcnn", anchor_sizes, min_level=min_level, max_level=max_level, ratios=(0.5, 1.0, 2.0))
    rpn_head = RPNHead(fpn_channels, anchors.num_anchors_per_location()[0], conv_depth=rpn_convs)
    roi_pool = MultiScaleRoIAlign([f"p{lvl}" for lvl in pyramid.fpn_levels], output_size=7, sampling_ratio=2)
    roi_head = None  # FasterRCNN's default: TwoMLPHead(channels * 7 * 7, 1024)
    if box_head == "conv":
        roi_head = FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [1024], norm_layer=nn.BatchNorm2d)
    model = FasterRCNN(
        pyramid,
        classes,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        box_roi_pool=roi_pool,
        box_head=roi_head,
        box_score_thresh=score_thresh,
        box_nms_thresh=nms_thresh,
        box_detections_per_img=detections_per_img,
        **_TORCHVISION_SIZES,
    )
    model.transform = NormalizeAndPad(size_divisible=max(32, 2**max_level))
    return model


def fasterrcnn_from_config(cfg: ModelConfig, *, num_classes: int) -> FasterRCNN:
    return build_fasterrcnn(
        backbone=cfg.backbone,
        num_classes=num_classes,
        min_level=cfg.min_level,
        max_level=cfg.max_level,
        fpn_channels=cfg.fpn_channels,
        anchor_sizes=cfg.anchor_sizes,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
        norm=cfg.norm,
        norm_eps=cfg.norm_eps,
        top_levels=cfg.top_levels,
        fpn_norm=cfg.fpn_norm,
        rpn_convs=cfg.rpn_convs,
        box_head=cfg.box_head,
    )


# arch -> its builder's from_config: how a ModelConfig becomes that arch's network
DETECTOR_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "fcos": fcos_from_config,
    "retinanet": retinanet_from_config,
    "fasterrcnn": fasterrcnn_from_config,
}
ARCHS = tuple(DETECTOR_BUILDERS)


def multiscale_from_config(cfg: ModelConfig, *, num_classes: int) -> MultiScaleDetector:
    """MSAD's aligned multi-scale teacher: one shared ``cfg.arch`` network spanning P(min_level - k)..P(max_level)."""
    if cfg.arch not in ("fcos", "retinanet"):
        raise ValueError(f"the multi-scale (MSAD) teacher needs a one-stage arch (fcos or retinanet), got {cfg.arch!r}")
    sizes = resolved_anchor_sizes(cfg)
    _check_anchor_levels(sizes, min_level=cfg.min_level, max_level=cfg.max_level)
    shift = level_shift(cfg.low_res_scale)
    low_min = cfg.min_level - shift
    if low_min < 2:
        raise ValueError(
            f"min_level {cfg.min_level} leaves no level P{low_min} for the low-resolution branch; "
            f"use min_level >= {2 + shift}"
        )
    shared = cfg.model_copy(update={"min_level": low_min, "anchor_sizes": None, "multiscale": False})
    return MultiScaleDetector(
        DETECTOR_BUILDERS[cfg.arch](shared, num_classes=num_classes),
        min_level=cfg.min_level,
        max_level=cfg.max_level,
        anchor_sizes=sizes,
        low_res_scale=cfg.low_res_scale,
        fused_loss_weight=cfg.fused_loss_weight,
        low_res_transform=NormalizeAndPad(size_divisible=max(32, 2 ** (cfg.max_level - shift))),
    )


def resolved_anchor_sizes(cfg: ModelConfig) -> list[list[float]]:
    """``cfg.anchor_sizes``, or the arch's defaults for its levels, as floats."""
    sizes = cfg.anchor_sizes
    if sizes is None:
        sizes = default_anchor_sizes(cfg.arch, cfg.min_level, cfg.max_level)
    return [[float(v) for v in s] for s in sizes]


def build_detector_from_config(cfg: ModelConfig, *, num_classes: int) -> nn.Module:
    """The one way a detector is built (no weights); ``cfg.num_classes`` wins over ``num_classes`` when set.

    ``cfg.trainable_layers`` freezes the body's lower stages (``requires_grad=False``).

    The network part of ``cfg`` (:data:`~detkd.config.NETWORK_KEYS`, class count and anchor
    sizes resolved) is kept in ``model.detkd_config``: a checkpoint stores it, and
    :func:`rebuild_detector` builds the same network from it.
    """
    classes = cfg.num_classes if cfg.num_classes is not None else num_classes
    if cfg.arch == "mmdet":
        assert cfg.mmdet_config is not None  # checked by ModelConfig
        return build_mmdet_detector(
            mmdet_config=read_mmdet_config(Path(cfg.mmdet_config)),
            num_classes=classes,
            config_file=str(cfg.mmdet_config),
        )
    if cfg.arch == "hf":
        assert cfg.hf_model is not None  # checked by ModelConfig
        return build_hf_detector(
            hf_config=read_hf_config(Path(cfg.hf_model)),
            num_classes=classes,
            source=str(cfg.hf_model),
            canvas=cfg.hf_canvas,
        )
    cfg = cfg.model_copy(update={"num_classes": classes, "anchor_sizes": resolved_anchor_sizes(cfg)})
    if cfg.multiscale:
        model: nn.Module = multiscale_from_config(cfg, num_classes=classes)
    else:
        model = DETECTOR_BUILDERS[cfg.arch](cfg, num_classes=classes)
    model.detkd_config = cfg.model_dump(include=set(NETWORK_KEYS))
    if cfg.trainable_layers is not None:  # a training setting: not part of the network a checkpoint rebuilds
        freeze_body(pyramid_backbone(single_scale(model)).body, cfg.backbone, trainable_layers=cfg.trainable_layers)
    return model


def build_detector(**fields: Any) -> nn.Module:
    """:func:`build_detector_from_config` with :class:`~detkd.config.ModelConfig` fields as keywords.

    ``num_classes`` is required; weight files are refused (``detkd.models.checkpoint.build_model`` loads them).
    """
    weights = sorted({"weights", "backbone_weights"} & set(fields))
    if weights:
        raise TypeError(f"build_detector builds no weights ({', '.join(weights)}): use detkd.models.build_model")
    if fields.get("num_classes") is None:
        raise TypeError("build_detector needs num_classes")
    return build_detector_from_config(model_config(fields, source="build_detector"), num_classes=fields["num_classes"])


def model_config(fields: dict[str, Any], *, source: str) -> ModelConfig:
    """Validate builder keywords (e.g. a checkpoint's ``detkd_config``) as a ModelConfig; errors name ``source``."""
    try:
        return ModelConfig.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, source)) from None


def rebuild_detector(config: dict[str, Any]) -> nn.Module:
    """The detector (no weights) described by a checkpoint's builder config (``model.detkd_config``)."""
    config = dict(config)
    if config.get("arch") == "mmdet":
        config.pop("arch")
        return build_mmdet_detector(**config)
    if config.get("arch") == "hf":
        config.pop("arch")
        return build_hf_detector(**config)
    if config.get("arch") == "vit":  # a backbone teacher: features only
        config.pop("arch")
        return build_vit_teacher(**config)
    return build_detector(**config)


def dense_class_logits(head: nn.Module, features: list[Tensor]) -> Tensor:
    """(N, sum HWA, K) class logits of a RetinaNet or FCOS head without its box branch."""
    if isinstance(head, (GroupNormFCOSHead, LiteFCOSHead)):
        return head.class_logits(features)
    return head.classification_head(features)


def single_scale(model: nn.Module) -> nn.Module:
    """The network that holds the weights: a multi-scale teacher's shared detector, else the model."""
    model = unwrap_model(model)
    return model.detector if isinstance(model, MultiScaleDetector) else model


def pyramid_backbone(model: nn.Module) -> PyramidBackbone:
    """The body + FPN of a single-scale detkd detector (TypeError for anything else)."""
    model = unwrap_model(model)
    if isinstance(model, (FCOS, RetinaNet, FasterRCNN)) and isinstance(model.backbone, PyramidBackbone):
        return model.backbone
    raise TypeError(f"not a single-scale detkd detector: {type(model).__name__}")


def pyramid_strides(model: nn.Module) -> dict[str, int]:
    """Level name -> stride in input pixels, e.g. {"p3": 8, ...}."""
    model = unwrap_model(model)
    if isinstance(model, (MultiScaleDetector, MMDetDetector, HFDetector, ViTFeatureTeacher)):
        return dict(model.strides)
    return dict(pyramid_backbone(model).strides)


def detector_config(model: nn.Module) -> dict[str, Any]:
    """The builder config that rebuilds ``model`` with :func:`rebuild_detector`."""
    return dict(unwrap_model(model).detkd_config)


def set_inference_thresholds(model: nn.Module, *, score_thresh: float, detections_per_img: int) -> None:
    """COCO evaluation wants low score thresholds; deployment wants higher ones."""
    model = single_scale(model)  # the multi-scale teacher predicts through its shared detector
    if isinstance(model, (MMDetDetector, HFDetector)):
        model.set_thresholds(score_thresh=score_thresh, detections_per_img=detections_per_img)
    elif isinstance(model, FasterRCNN):
        model.roi_heads.score_thresh = score_thresh
        model.roi_heads.detections_per_img = detections_per_img
    elif isinstance(model, (FCOS, RetinaNet)):
        model.score_thresh = score_thresh
        model.detections_per_img = detections_per_img
    else:
        raise TypeError(f"not a detkd detector: {type(model).__name__}")
