"""Typed run configuration loaded from YAML, with dotted command-line overrides.

Every section forbids unknown keys, so a typo fails loudly with the key's dotted
path instead of being silently ignored.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


class _LocalPathMarker:
    """Marks a path field that Ray workers (other cwd, other node) need made absolute; URIs stay as given."""

    def __repr__(self) -> str:
        return "LocalPath"


LOCAL_PATH = _LocalPathMarker()
LocalPath = Annotated[Path, LOCAL_PATH]
PathOrURI = Annotated[str, LOCAL_PATH]  # a folder, or a URI (s3://...) that is left as given


def is_local_path(field: FieldInfo) -> bool:
    """Whether a field is typed ``LocalPath``/``PathOrURI`` (or optionally so)."""

    def marked(annotation: Any) -> bool:
        if LOCAL_PATH in getattr(annotation, "__metadata__", ()):
            return True
        return any(marked(arg) for arg in get_args(annotation))

    # pydantic moves a top-level Annotated's metadata to the field; inside ``X | None`` it stays in the annotation
    return LOCAL_PATH in field.metadata or marked(field.annotation)


def absolute_paths(model: Any, base: Path) -> Any:
    """A copy of ``model`` with every local-path field, in every nested section, resolved against ``base``.

    Fields are found by type (:data:`LocalPath`), so a new path field is covered without a list.
    """

    def fix(value: Any) -> Any:
        if value in (None, "") or "://" in str(value):
            return value
        return str((base / value).resolve())

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, BaseModel):
            return value
        update = {}
        for name, field in type(value).model_fields.items():
            current = getattr(value, name)
            update[name] = fix(current) if is_local_path(field) else walk(current)
        return value.model_copy(update=update)

    return type(model).model_validate(walk(model).model_dump())


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SplitConfig(_Section):
    """One split, in one of four formats: ``{coco, images}``, ``{parquet}``, ``{yolo, split}`` or ``{voc, split}``."""

    coco: LocalPath | None = Field(None, description="a COCO instances JSON (with images)")
    images: LocalPath | None = Field(None, description="the folder the COCO file_names are relative to")
    parquet: LocalPath | None = Field(None, description="Parquet shards: a file or a folder of them")
    yolo: LocalPath | None = Field(None, description="an Ultralytics-style YOLO data.yaml (with split)")
    voc: LocalPath | None = Field(
        None, description="a Pascal VOC folder: Annotations/, ImageSets/Main/, JPEGImages/ (with split)"
    )
    split: str | None = Field(None, description="yolo: train, val or test; voc: an ImageSets/Main name, e.g. trainval")
    classes: list[str] | None = Field(None, description="voc: class names in id order (default: the 20 VOC classes)")

    @model_validator(mode="after")
    def _one_format(self) -> SplitConfig:
        given = [
            name
            for name, present in (
                ("coco+images", self.coco is not None or self.images is not None),
                ("parquet", self.parquet is not None),
                ("yolo", self.yolo is not None),
                ("voc", self.voc is not None),
            )
            if present
        ]
        if len(given) != 1:
            got = f"got {' and '.join(given)}" if given else "got none"
            raise ValueError(f"give one dataset format: coco+images, parquet, yolo+split or voc+split ({got})")
        if given == ["coco+images"] and (self.coco is None or self.images is None):
            raise ValueError(f"a COCO split needs both coco and images; missing {'images' if self.coco else 'coco'}")
        if self.yolo is not None or self.voc is not None:
            if not self.split:
                raise ValueError(f"a {given[0]} split needs split (which split of the dataset to read)")
            if self.yolo is not None and self.split not in ("train", "val", "test"):
                raise ValueError(f"split: a YOLO data.yaml has train, val and test splits, got {self.split!r}")
        elif self.split is not None:
            raise ValueError("split picks a split of a yolo or voc dataset; remove it or give yolo/voc")
        if self.classes is not None:
            if self.voc is None:
                raise ValueError("classes names the classes of a voc dataset (YOLO's are in its data.yaml)")
            if not self.classes or len(set(self.classes)) != len(self.classes):
                raise ValueError(f"classes must be a non-empty list of distinct names, got {self.classes}")
        return self

    def location(self) -> str:
        """Where the split's data is, for lineage and messages: a path, ``#<split>`` for YOLO and VOC."""
        if self.yolo is not None or self.voc is not None:
            return f"{self.yolo or self.voc}#{self.split}"
        return str(self.coco or self.parquet)


class DataConfig(_Section):
    train: SplitConfig | None = None
    val: SplitConfig | None = None
    test: SplitConfig | None = Field(
        None, description="held out: never read by training; sweeps score their chosen config on it"
    )
    skip_invalid: bool = False
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker")


# Marks a ModelConfig field of detkd's torchvision networks; an MMDetection or transformers config describes its own.
_TV = {"framework": "torchvision"}
# The archs whose network comes from another framework's config file, and that file's field.
FOREIGN_ARCHS = {"mmdet": "mmdet_config", "hf": "hf_model"}


class ModelConfig(_Section):
    """The one list of model settings and their defaults (num_classes None = from the data).

    Each arch's builder takes its settings from here (``detkd.models.detectors``: ``fcos_from_config``...)
    and a checkpoint stores the validated network part. ``arch: mmdet`` builds the ``model``
    section of the MMDetection 3.x config file ``mmdet_config`` instead
    (``detkd.models.mmdet_detector``); ``weights`` may then be a detkd checkpoint or an
    MMDetection one, and the fields marked torchvision do not apply. ``arch: hf`` builds a
    Hugging Face ``transformers`` detector (DETR family) from ``hf_model``, a folder written by
    ``save_pretrained`` (its weights are loaded, class layers re-initialised when the classes
    differ) or a ``config.json`` alone (random weights) (``detkd.models.hf_detector``).
    """

    arch: Literal["fcos", "retinanet", "fasterrcnn", "mmdet", "hf"] = "fcos"
    mmdet_config: LocalPath | None = Field(None, description="arch mmdet: an MMDetection 3.x config file")
    hf_model: LocalPath | None = Field(
        None,
        description="arch hf: a transformers save_pretrained folder (config.json + model.safetensors) or a "
        "config.json (random weights): RT-DETR, RT-DETRv2, D-FINE, Deformable DETR or DETR",
    )
    hf_canvas: int | None = Field(
        None,
        ge=32,
        description="arch hf: the least square side (px) every batch is padded to, so an image gets the same "
        "detections in any batch (RT-DETR's positions ignore the padding mask) and the model exports to ONNX; "
        "None: the input view's largest side, (input.max_size or input.size) x input.scale",
    )
    backbone: Literal[
        "tiny", "resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "mobilenet_v3_small", "swin_t", "swin_s"
    ] = Field("tiny", json_schema_extra=_TV)
    num_classes: int | None = Field(None, ge=1)
    min_level: int = Field(3, ge=2, le=5, json_schema_extra=_TV)
    max_level: int = Field(7, ge=2, le=7, description="levels above P5: see top_levels", json_schema_extra=_TV)
    fpn_channels: int = Field(64, ge=8, json_schema_extra=_TV)
    head_convs: int = Field(
        2, ge=1, description="conv layers per FCOS head branch (RetinaNet/Faster R-CNN: fixed)", json_schema_extra=_TV
    )
    design: Literal["standard", "lite"] = Field(
        "standard",
        description="FCOS only. lite: the CPU-deployment student (separable FPN and shared separable head "
        "tower with per-level BatchNorm; detkd.models.lite)",
        json_schema_extra=_TV,
    )
    anchor_sizes: list[list[float]] | None = Field(
        None, description="per level; default: proportional to each level's stride", json_schema_extra=_TV
    )
    score_thresh: float = Field(0.05, ge=0, le=1, json_schema_extra=_TV)
    nms_thresh: float = Field(0.6, gt=0, le=1, json_schema_extra=_TV)
    detections_per_img: int = Field(100, ge=1, json_schema_extra=_TV)
    norm: Literal["bn", "frozen_bn"] = Field(
        "bn",
        description="the backbone's BatchNorm: bn trains it; frozen_bn fixes its statistics and affine "
        "(torchvision's FrozenBatchNorm2d, as its detection references fine-tune pretrained backbones)",
        json_schema_extra=_TV,
    )
    norm_eps: float | None = Field(
        None,
        ge=0,
        description="epsilon of the backbone's BatchNorm; None: the backbone's own (ResNet 1e-5, MobileNetV3 "
        "1e-3). torchvision's COCO files of retinanet_resnet50_fpn and fasterrcnn_resnet50_fpn run with 0.0",
        json_schema_extra=_TV,
    )
    top_levels: Literal["conv_p5", "conv_c5", "maxpool"] = Field(
        "conv_p5",
        description="how the levels above P5 are made: conv_p5: stride-2 convs from P5 (P6, P7); conv_c5: the "
        "first from C5 (torchvision's RetinaNet v2); maxpool: P6 = P5 subsampled, no weights (torchvision's "
        "Faster R-CNN; max_level 6 at most)",
        json_schema_extra=_TV,
    )
    fpn_norm: Literal["none", "bn"] = Field(
        "none",
        description="normalisation in the FPN's convs: bn as torchvision's fasterrcnn_resnet50_fpn_v2",
        json_schema_extra=_TV,
    )
    fcos_box_activation: Literal["softplus", "relu"] = Field(
        "softplus",
        description="FCOS: what makes the box distances positive. softplus (detkd's: never stuck at zero) or "
        "relu (torchvision's fcos_resnet50_fpn; its files also load into the softplus head)",
        json_schema_extra=_TV,
    )
    head_norm: Literal["gn", "none"] = Field(
        "gn",
        description="RetinaNet: GroupNorm in the head's convs, or none (torchvision's retinanet_resnet50_fpn v1)",
        json_schema_extra=_TV,
    )
    box_loss: Literal["l1", "giou"] = Field(
        "l1",
        description="RetinaNet: the box regression loss; giou as torchvision's retinanet_resnet50_fpn_v2",
        json_schema_extra=_TV,
    )
    rpn_convs: int = Field(
        1,
        ge=1,
        le=4,
        description="Faster R-CNN: 3x3 convs in the RPN head (torchvision's v2: 2)",
        json_schema_extra=_TV,
    )
    box_head: Literal["mlp", "conv"] = Field(
        "mlp",
        description="Faster R-CNN box head: mlp (two fc layers, torchvision's v1) or conv (four 3x3 convs with "
        "BatchNorm and one fc layer, torchvision's v2)",
        json_schema_extra=_TV,
    )
    backbone_weights: LocalPath | None = Field(
        None,
        description="a torchvision classification state dict of the backbone, or a torchvision detection file "
        "whose backbone.body this backbone is",
        json_schema_extra=_TV,
    )
    weights: LocalPath | None = Field(
        None,
        description="a detkd checkpoint, a torchvision detection state dict or an MMDetection checkpoint; class "
        "layers are re-initialised when the classes differ, a file that fits poorly is refused (docs/pretrained.md)",
    )
    trainable_layers: int | None = Field(
        None,
        ge=0,
        description="train only the top N stages of the backbone (torchvision's trainable_backbone_layers; "
        "ResNet 0..5: layer4, layer3, ... conv1), freeze the rest; None: all trainable",
    )
    multiscale: bool = Field(
        False, description="MSAD aligned multi-scale teacher (one-stage archs)", json_schema_extra=_TV
    )
    low_res_scale: float = Field(
        0.5, gt=0, lt=1, description="multi-scale teacher: the low-resolution branch's scale", json_schema_extra=_TV
    )
    fused_loss_weight: float = Field(
        0.4, ge=0, description="multi-scale teacher: weight of the fused branch's loss", json_schema_extra=_TV
    )

    @model_validator(mode="after")
    def _levels(self) -> ModelConfig:
        if self.arch == "mmdet" and self.mmdet_config is None:
            raise ValueError("arch mmdet needs mmdet_config: an MMDetection 3.x config file")
        if self.arch == "hf" and self.hf_model is None:
            raise ValueError("arch hf needs hf_model: a transformers save_pretrained folder or a config.json")
        if self.arch in FOREIGN_ARCHS:
            defaults = ModelConfig.model_fields
            changed = [k for k in TORCHVISION_MODEL_KEYS if getattr(self, k) != defaults[k].default]
            own = FOREIGN_ARCHS[self.arch]
            if changed:
                why = (
                    " (the MSAD multi-scale teacher wraps detkd's torchvision detectors only)"
                    if "multiscale" in changed
                    else ""
                )
                raise ValueError(
                    f"{', '.join(changed)}: not used with arch {self.arch}, whose network, levels and "
                    f"post-processing come from {own}; remove them or edit that config{why}"
                )
            if self.trainable_layers is not None:
                raise ValueError(
                    f"trainable_layers: not used with arch {self.arch}; freeze layers in {own} "
                    "(MMDetection: frozen_stages; transformers: the backbone config's freeze settings)"
                )
        if self.mmdet_config is not None and self.arch != "mmdet":
            raise ValueError(f"mmdet_config is only read with arch mmdet (arch is {self.arch})")
        if self.hf_model is not None and self.arch != "hf":
            raise ValueError(f"hf_model is only read with arch hf (arch is {self.arch})")
        if self.hf_canvas is not None and self.arch != "hf":
            raise ValueError(f"hf_canvas is only read with arch hf (arch is {self.arch})")
        self._arch_settings()
        if self.design != "standard" and self.arch != "fcos":
            raise ValueError(f"design {self.design!r} is an FCOS design (arch is {self.arch})")
        if self.design != "standard" and self.multiscale:
            raise ValueError(
                f"design {self.design!r} is a student design; the MSAD multi-scale teacher (multiscale: true) "
                "uses the standard one"
            )
        if self.max_level < self.min_level:
            raise ValueError(f"max_level ({self.max_level}) must be >= min_level ({self.min_level})")
        return self

    def _arch_settings(self) -> None:
        """Refuse a setting of another arch (or design) than the one built, instead of ignoring it."""
        defaults = ModelConfig.model_fields
        owners = {
            "fcos_box_activation": ("fcos",),
            "head_norm": ("retinanet",),
            "box_loss": ("retinanet",),
            "rpn_convs": ("fasterrcnn",),
            "box_head": ("fasterrcnn",),
        }
        for key, archs in owners.items():
            foreign = self.arch in FOREIGN_ARCHS  # refused above, with the config file to edit instead
            if not foreign and self.arch not in archs and getattr(self, key) != defaults[key].default:
                raise ValueError(f"{key} is a {'/'.join(archs)} setting (arch is {self.arch})")
        if self.design == "lite" and (self.fcos_box_activation != "softplus" or self.fpn_norm != "none"):
            raise ValueError(
                "design lite has its own separable FPN and softplus head: fcos_box_activation and "
                "fpn_norm keep their defaults"
            )
        if self.top_levels == "maxpool" and self.max_level > 6:
            raise ValueError(f"top_levels maxpool makes one level above P5 (P6): max_level {self.max_level} > 6")


# The ModelConfig keys of a torchvision-based detkd network, read off the schema.
TORCHVISION_MODEL_KEYS = tuple(
    name for name, field in ModelConfig.model_fields.items() if field.json_schema_extra == _TV
)
# What a builder takes (weight files are loaded afterwards by detkd.models.checkpoint).
NETWORK_KEYS = ("arch", "num_classes", *(k for k in TORCHVISION_MODEL_KEYS if k != "backbone_weights"))


# The models' normalisation mean (detkd.models.detectors.IMAGENET_MEAN): padding of this colour normalises to 0,
# the value torchvision's detectors pad a batch with.
PAD_FILL = (0.485, 0.456, 0.406)

Range = tuple[float, float]


def _check_range(name: str, value: Range | tuple[int, int] | None, *, low: float | None = None) -> None:
    if value is None:
        return
    if value[0] > value[1]:
        raise ValueError(f"{name}: [{value[0]}, {value[1]}] is not a range (min > max)")
    if low is not None and value[0] < low:
        raise ValueError(f"{name}: values must be >= {low}, got {value[0]}")


def _check_fill(fill: tuple[float, float, float]) -> None:
    if not all(0.0 <= v <= 1.0 for v in fill):
        raise ValueError(f"fill: RGB values in [0, 1] (images are float in [0, 1]), got {list(fill)}")


class ScaleJitterConfig(_Section):
    """Random training scale (``detkd.data.augment``): exactly one of ``short_side`` or ``ratio``."""

    short_side: tuple[int, int] | None = Field(
        None,
        description="[min, max]: each sample's short side in px, drawn uniformly (both ends included) instead "
        "of input.size; the long side stays capped at input.max_size (torchvision's RandomShortestSize)",
    )
    ratio: tuple[float, float] | None = Field(
        None,
        description="[lo, hi]: large-scale jitter: resize by r x the reference view's factor (r uniform in "
        "[lo, hi]), then crop (random window) or pad (bottom/right) to an input.size x input.size canvas",
    )
    fill: tuple[float, float, float] = Field(PAD_FILL, description="ratio: RGB in [0, 1] of the canvas padding")

    @model_validator(mode="after")
    def _one_kind(self) -> ScaleJitterConfig:
        if (self.short_side is None) == (self.ratio is None):
            raise ValueError("give exactly one of short_side: [min, max] or ratio: [lo, hi]")
        _check_range("short_side", self.short_side, low=1)
        if self.ratio is not None and self.ratio[0] <= 0:
            raise ValueError(f"ratio: values must be > 0, got {self.ratio[0]}")
        _check_range("ratio", self.ratio)
        if self.short_side is not None and tuple(self.fill) != PAD_FILL:  # by value: dumped configs hold the default
            raise ValueError("fill: only ratio pads a canvas; short_side has nothing to fill")
        _check_fill(self.fill)
        return self


class IoUCropConfig(_Section):
    """SSD's random crop (torchvision.transforms.v2.RandomIoUCrop); boxes whose centre leaves the crop are dropped."""

    p: float = Field(1.0, ge=0, le=1, description="probability of drawing a crop (an option 1.0 then keeps the image)")
    min_scale: float = Field(0.3, gt=0, le=1, description="crop side / image side, per axis, at least")
    max_scale: float = Field(1.0, gt=0, le=1)
    min_aspect_ratio: float = Field(0.5, gt=0, description="crop width / height, at least")
    max_aspect_ratio: float = Field(2.0, gt=0)
    sampler_options: list[float] = Field(
        default_factory=lambda: [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
        description="minimum IoU of some box with the crop, one drawn per try; 1.0 = keep the image as it is "
        "(required: torchvision retries until some option is met, and 1.0 always is)",
    )
    trials: int = Field(40, ge=1, description="crops tried per drawn option")

    @model_validator(mode="after")
    def _ranges(self) -> IoUCropConfig:
        _check_range("min_scale/max_scale", (self.min_scale, self.max_scale))
        _check_range("min_aspect_ratio/max_aspect_ratio", (self.min_aspect_ratio, self.max_aspect_ratio))
        if not self.sampler_options or not all(0.0 <= v <= 1.0 for v in self.sampler_options):
            raise ValueError(f"sampler_options: IoU values in [0, 1], got {self.sampler_options}")
        if 1.0 not in self.sampler_options:
            raise ValueError(
                "sampler_options must include 1.0 (keep the image): RandomIoUCrop retries until an option is met, "
                "so without it an image whose boxes no crop can satisfy would loop forever"
            )
        return self


class ZoomOutConfig(_Section):
    """Place the image on a larger canvas (torchvision.transforms.v2.RandomZoomOut): objects get smaller."""

    p: float = Field(0.5, ge=0, le=1)
    max_ratio: float = Field(4.0, ge=1, description="canvas side / image side drawn uniformly in [1, max_ratio]")
    fill: tuple[float, float, float] = Field(PAD_FILL, description="RGB in [0, 1] of the canvas")

    @model_validator(mode="after")
    def _fill(self) -> ZoomOutConfig:
        _check_fill(self.fill)
        return self


class PhotometricConfig(_Section):
    """SSD's photometric distortion (torchvision.transforms.v2.RandomPhotometricDistort); boxes do not move."""

    p: float = Field(0.5, ge=0, le=1, description="probability of each distortion (and of a channel shuffle)")
    brightness: tuple[float, float] = Field((0.875, 1.125), description="factor range")
    contrast: tuple[float, float] = Field((0.5, 1.5), description="factor range")
    saturation: tuple[float, float] = Field((0.5, 1.5), description="factor range")
    hue: tuple[float, float] = Field((-0.05, 0.05), description="shift range, within [-0.5, 0.5]")

    @model_validator(mode="after")
    def _ranges(self) -> PhotometricConfig:
        for name in ("brightness", "contrast", "saturation"):
            _check_range(name, getattr(self, name), low=0)
        _check_range("hue", self.hue, low=-0.5)
        if self.hue[1] > 0.5:
            raise ValueError(f"hue: values must be <= 0.5, got {self.hue[1]}")
        return self


class AugmentConfig(_Section):
    """Box-aware training augmentation of the reference view (``detkd.data.augment``); evaluation never augments.

    Only the flip is on by default. Every op keeps boxes and labels paired: boxes are clipped to the
    image and those under 1 px a side are dropped with their labels.
    """

    hflip: float = Field(0.5, ge=0, le=1, description="probability of a left-right flip")
    scale_jitter: ScaleJitterConfig | None = Field(
        None, description="default: input.size (an MSAD multi-scale teacher: short_side [0.8 x size, size])"
    )
    iou_crop: IoUCropConfig | None = None
    zoom_out: ZoomOutConfig | None = None
    photometric: PhotometricConfig | None = None

    def ops(self) -> dict[str, _Section]:
        """The ops that are on, besides the flip."""
        return {
            name: getattr(self, name)
            for name in ("scale_jitter", "iou_crop", "zoom_out", "photometric")
            if getattr(self, name) is not None
        }


class InputConfig(_Section):
    """The reference (teacher) view is resized to ``size``; this model sees it scaled by ``scale``."""

    size: int = Field(128, ge=16, description="short side of the reference view in pixels")
    max_size: int | None = Field(None, ge=16)
    scale: float = Field(1.0, gt=0, le=4, description="this model's input = reference view x scale")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="before")
    @classmethod
    def _old_hflip(cls, data: Any) -> Any:
        """``input.hflip`` (configs and checkpoints written before ``input.augment``) is ``input.augment.hflip``."""
        if not isinstance(data, dict) or "hflip" not in data:
            return data
        data = dict(data)
        hflip = data.pop("hflip")
        augment = data.get("augment")
        if isinstance(augment, AugmentConfig):
            augment = augment.model_dump(exclude_unset=True)
        augment = {} if augment is None else augment
        if not isinstance(augment, dict):
            return data  # the field's own validation names the bad value
        if "hflip" in augment:
            raise ValueError("give the flip probability once: input.augment.hflip (input.hflip is its old name)")
        data["augment"] = {**augment, "hflip": hflip}
        return data

    @property
    def model_size(self) -> int:
        return int(round(self.size * self.scale))

    @property
    def largest_side(self) -> int:
        """This model's long side (px) when ``max_size`` caps it, else its short side: the canvas an ``hf`` model
        pads to unless ``model.hf_canvas`` says otherwise."""
        return int(round((self.max_size or self.size) * self.scale))


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(100, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[float] = Field(
        default_factory=lambda: [0.67, 0.89], description="fractions of training for 'step'"
    )
    gamma: float = Field(0.1, gt=0, le=1)
    clip_grad_norm: float | None = Field(10.0, gt=0)
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        "linear", description="lr is given for base_batch_size; scaled to the global batch by this rule"
    )
    base_batch_size: int = Field(16, ge=1)


class EMAConfig(_Section):
    """Weight EMA of the student: the average is what is evaluated, saved and published (engine/ema.py)."""

    decay: float = Field(0.9998, gt=0, lt=1, description="decay once warmed up (YOLOX: 0.9998)")
    warmup: int = Field(
        2000, ge=0, description="steps: decay at update t is decay * (1 - exp(-t / warmup)); 0: constant decay"
    )


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1, description="per worker")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    eval_every: int = Field(0, ge=0, description="evaluate every N epochs (0: only at the end)")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every K steps (0: epoch ends only)")
    log_every: int = Field(20, ge=1, description="steps between progress lines")
    amp: bool = Field(True, description="mixed precision on GPU (ignored on CPU)")
    ema: EMAConfig | None = Field(
        None, description="average the student's weights (None: off); evaluation and the model file use the average"
    )

    @model_serializer(mode="wrap")
    def _leave_out_ema_when_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dumps (config digests, sweep digests, logged params) of configs without EMA stay as they were."""
        data = handler(self)
        if self.ema is None:
            data.pop("ema", None)
        return data


class ScalingSection(_Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(
        None, gt=0, description="default: all CPUs / num_workers (a fraction shares a CPU, e.g. in sweeps)"
    )


class RunSection(_Section):
    storage_path: PathOrURI = Field(
        "runs/ray", description="a folder, or any URI pyarrow understands (s3://, gs://...)"
    )
    storage_endpoint: str | None = Field(None, description="S3 endpoint override, e.g. http://minio:9000")
    output_dir: LocalPath = Path("runs")
    max_failures: int = Field(1, ge=-1)
    keep_checkpoints: int = Field(2, ge=1)


class TrackingConfig(_Section):
    experiment: str = "detkd"
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db")
    log_model: bool = True
    outage_wait_s: float = Field(
        10.0,
        ge=0,
        description="at a run's end, how long to wait for a tracking server that stopped answering before "
        "keeping what it missed for `detkd tracking replay` (the training itself never waits)",
    )


class EvalConfig(_Section):
    batch_size: int = Field(8, ge=1)
    score_thresh: float = Field(0.01, ge=0, le=1)
    detections_per_img: int = Field(100, ge=1)


class TeacherRef(_Section):
    """A frozen teacher: a pipeline model name, a checkpoint path, ``mlflow:<run_id>``, ``models:/NAME@ALIAS`` or
    a transformers detector's ``save_pretrained`` folder; or a vision-transformer ``backbone`` that teaches
    features only.

    With ``mmdet_config``, ``source`` is an MMDetection checkpoint file (e.g. from its model
    zoo) for the model that config describes.
    """

    source: str | None = None
    mmdet_config: LocalPath | None = Field(
        None, description="source is an MMDetection checkpoint of the model in this MMDetection config file"
    )
    backbone: str | None = Field(
        None,
        description="a feature teacher: a vision transformer's save_pretrained folder (DINOv2, DINOv3, ViT), or "
        "dinov2 / dinov3 from the local Hugging Face cache (detkd.models.vit_teacher)",
    )
    layers: list[int] | None = Field(
        None, description="backbone: the blocks whose patch tokens teach (their mean); default [-1], the last"
    )
    input_scale: float | None = Field(
        None, gt=0, description="teacher input / reference view; default: its checkpoint's input size / input.size"
    )

    @model_validator(mode="after")
    def _one_teacher(self) -> TeacherRef:
        if (self.source is None) == (self.backbone is None):
            raise ValueError("give a teacher's source or its backbone (a feature teacher), one of the two")
        if self.backbone is not None and self.mmdet_config is not None:
            raise ValueError("mmdet_config goes with an MMDetection checkpoint in source, not with backbone")
        if self.layers is not None and self.backbone is None:
            raise ValueError("layers are the blocks of a backbone teacher; this teacher has none")
        return self

    @property
    def label(self) -> str:
        """How runs and sweeps name this teacher."""
        return self.source if self.source is not None else f"backbone {self.backbone}"


class MSEConfig(_Section):
    teacher: int = Field(0, ge=0, description="index into distill.teachers")
    weight: float = Field(1.0, ge=0)


class CosineConfig(_Section):
    """The paper-free cosine distance (detkd.distill.cosine): for feature teachers of another scale (ViTs)."""

    teacher: int = Field(0, ge=0, description="index into distill.teachers")
    weight: float = Field(1.0, ge=0)


class SSIMConfig(_Section):
    teacher: int = Field(0, ge=0)
    weight: float = Field(3.0, ge=0, description="lambda (2..4 in the paper)")
    adapter: bool = Field(False, description="1x1 adapter on the student (forced when channels differ)")
    window_size: int = Field(11, ge=1)
    sigma: float = Field(1.5, gt=0)


class MGDConfig(_Section):
    teacher: int = Field(0, ge=0)
    weight: float = Field(2e-5, ge=0, description="alpha (RetinaNet 2e-5, Mask R-CNN 5e-7)")
    mask_ratio: float = Field(0.65, ge=0, lt=1, description="lambda: fraction of positions masked")


class MSADConfig(_Section):
    teacher: int = Field(0, ge=0)
    alpha: float = Field(0.2, ge=0)
    temperature: float = Field(3.0, gt=0)
    ramp_iters: int = Field(500, ge=0)


class DSAMKDConfig(_Section):
    """Our reading of DSAMKD (only its abstract is public); every open choice is a field."""

    teacher: int = Field(0, ge=0)
    feature_weight: float = Field(
        2e-6, ge=0, description="its reconstruction term sums several scales: ~10x MGD's at equal weight"
    )
    logit_weight: float = Field(1.0, ge=0)
    kernel_sizes: list[int] = Field(default_factory=lambda: [1, 3, 5])
    mask_ratio: float = Field(0.5, ge=0, lt=1)
    attention_temperature: float = Field(0.5, gt=0)
    logit_temperature: float = Field(1.0, gt=0)


METHOD_ORDER = ("mse", "cosine", "ssim", "mgd", "msad", "dsamkd")


class StageConfig(_Section):
    """One progressive stage: its teacher and a partial run config over the student's."""

    teacher: TeacherRef
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _detector_teacher(self) -> StageConfig:
        if self.teacher.backbone is not None:
            raise ValueError(
                "a progressive stage's teacher is a detector; a backbone teacher goes in distill.teachers beside one"
            )
        return self


class DistillConfig(_Section):
    teachers: list[TeacherRef] = Field(default_factory=list)
    mse: MSEConfig | None = None
    cosine: CosineConfig | None = None
    ssim: SSIMConfig | None = None
    mgd: MGDConfig | None = None
    msad: MSADConfig | None = None
    dsamkd: DSAMKDConfig | None = None
    init_from_teacher: bool = Field(False, description="copy every teacher-0 tensor whose name and shape match")
    copy_neck_head: bool = Field(False, description="copy teacher-0 FPN and head where shapes match")
    stages: list[StageConfig] = Field(default_factory=list, description="progressive: teachers weaker first")
    teacher_bf16: bool = Field(True, description="GPU: run frozen teachers under bf16 autocast")
    teacher_channels_last: bool = Field(True, description="GPU: frozen teachers in channels-last memory format")

    def methods(self) -> dict[str, _Section]:
        return {name: getattr(self, name) for name in METHOD_ORDER if getattr(self, name) is not None}

    @property
    def method_name(self) -> str:
        if self.stages:
            return "progressive"
        return "+".join(self.methods()) or "kd_off"

    @model_validator(mode="after")
    def _teachers_exist(self) -> DistillConfig:
        if self.stages:
            if self.teachers:
                raise ValueError("give teachers per stage (stages[k].teacher), not distill.teachers as well")
            return self
        for name, method in self.methods().items():
            if method.teacher >= len(self.teachers):
                raise ValueError(f"{name}.teacher={method.teacher} but only {len(self.teachers)} teacher(s) are listed")
        return self


class DebugConfig(_Section):
    """Test-only switches: never set these in real runs."""

    fail_at_step: int | None = Field(
        None, ge=1, description="kill one worker once after this step (3 s later, once Ray has collected its reports)"
    )
    fail_rank: int = Field(-1, description="which worker to kill (-1: the last)")


class Config(_Section):
    """A teacher or student training run."""

    name: str = "run"
    role: Literal["teacher", "student"] = "teacher"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    distill: DistillConfig | None = None
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @property
    def method(self) -> str:
        return self.distill.method_name if self.distill is not None else "kd_off"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``key.path=value`` set.

    A list of named entries (a pipeline's ``teachers``, ``students``, ``tune``) is entered by
    name: ``students.student_ssim.settings.train.epochs=1``."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            path = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = named_entry(node, part, text=text, path=path)
                continue
            child = node.setdefault(part, {})
            if not isinstance(child, dict | list):
                raise ConfigError(f"override {text!r}: {path} is not a section")
            node = child
        if isinstance(node, list):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[:-1])} is a list; name one of its entries")
        node[parts[-1]] = value
    return out


def named_entry(entries: list[Any], name: str, *, text: str, path: str) -> dict[str, Any]:
    """The entry of a list of named sections that an override's path names."""
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    names = [entry.get("name") for entry in entries if isinstance(entry, dict) and entry.get("name")]
    raise ConfigError(f"override {text!r}: no entry named {name!r} at {path} (entries: {', '.join(names) or 'none'})")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (one level of defaults: pipeline defaults + per-model settings)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, found {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], *, source: str, model: type[BaseModel] = Config) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: Path, overrides: list[str] | None = None) -> Config:
    """Load a run config; relative data paths stay relative to the working directory."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_config(data, source=str(path))
