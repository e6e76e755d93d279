"""MMDetection 3.x detectors behind the detection interface the rest of detkd uses.

``MMDetDetector`` wraps a detector built from an MMDetection config so that it behaves
like detkd's torchvision models: ``model(images, targets)`` returns a dict of scalar
losses in training (MMDetection's own losses) and ``model(images)`` returns
``[{"boxes", "scores", "labels"}]`` in eval mode, in input pixels, labels 1..K (detkd's
label space: 0 is background). Images arrive as detkd gives them to every detector:
RGB floats in [0, 1], already resized by the data pipeline. The wrapper applies the
config's ``data_preprocessor`` normalisation itself (its mean/std on the 0-255 scale
and its channel order: MMDetection loads BGR and flips to RGB only when the config asks),
so model-zoo weights see the input they were trained on; it pads like detkd's models, to
a multiple of the coarsest stride, so cross-resolution pyramids pair exactly.

The taps are the neck's outputs, named ``p<log2 stride>`` from the head's prior
generator, and, for single-stage heads with sigmoid classifiers, the head's dense class
logits (N, A*K, H, W) per level: K channels, no background slot.

``mmdet`` and ``mmcv`` (with its compiled ops) are imported only when a detector is
built: the plain install never needs them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkd.extras import MissingExtra, missing_extra

INSTALL_HINT = "install it with `bash scripts/install_mmdet.sh` (mmdet 3.3 + mmcv 2.1.0 built with its ops)"


class MMDetUnavailable(MissingExtra, RuntimeError):
    """MMDetection (or mmcv's compiled ops) is not installed (a user error: the CLI prints one line)."""


def import_mmdet() -> None:
    """Import mmdet's models and register them in the default scope, or say how to install them."""
    try:
        import mmcv.ops  # noqa: F401  (compiled NMS and RoIAlign: mmdet's heads need them)
        import mmdet.models  # noqa: F401
        from mmdet.utils import register_all_modules
    except ImportError as exc:
        raise missing_extra("mmdet", why="model.arch 'mmdet'", detail=str(exc), cls=MMDetUnavailable) from None
    register_all_modules(init_default_scope=True)


def _plain(value: Any, where: str) -> Any:
    """A config value as JSON-able data (tuples become lists); anything else is refused."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{where}: {type(value).__name__} is not plain data; detkd stores the model config as JSON")


def read_mmdet_config(path: Path) -> dict[str, Any]:
    """The ``model`` section of an MMDetection config file, as plain data (``_base_`` files resolved)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: MMDetection config file not found")
    try:
        from mmengine.config import Config
    except ImportError as exc:
        raise missing_extra("mmdet", why=f"reading {path}", detail=str(exc), cls=MMDetUnavailable) from None
    try:
        cfg = Config.fromfile(str(path))
    except Exception as exc:  # mmengine raises SyntaxError, KeyError, FileNotFoundError for _base_, ...
        raise ValueError(f"{path}: not a readable MMDetection config ({type(exc).__name__}: {exc})") from None
    if "model" not in cfg:
        raise ValueError(f"{path}: the config has no `model` section")
    return _plain(cfg.model.to_dict(), f"{path.name}: model")


def model_section_digest(path: Path) -> str:
    """SHA-256 of a config file's resolved ``model`` section (``_base_`` files included, comments not)."""
    model = read_mmdet_config(path)
    return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()


def _drop_pretrained(cfg: Any) -> Any:
    """Remove ``init_cfg=dict(type='Pretrained', ...)`` everywhere: it would download; weights come from files."""
    if isinstance(cfg, dict):
        out = {}
        for key, value in cfg.items():
            if key == "init_cfg" and isinstance(value, dict) and value.get("type") == "Pretrained":
                out[key] = None
            else:
                out[key] = _drop_pretrained(value)
        return out
    if isinstance(cfg, list):
        return [_drop_pretrained(v) for v in cfg]
    return cfg


def _class_heads(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The head section(s) of a model config that carry ``num_classes`` (cascades list several)."""
    if "bbox_head" in cfg:
        return [cfg["bbox_head"]]
    if "roi_head" in cfg:
        heads = cfg["roi_head"]["bbox_head"]
        return heads if isinstance(heads, list) else [heads]
    raise ValueError(f"the {cfg.get('type')} config has neither bbox_head nor roi_head: no class count")


def config_classes(cfg: Mapping[str, Any]) -> int:
    """The class count (without background) a model config's detection head predicts."""
    return int(_class_heads(cfg)[0]["num_classes"])


def with_classes(cfg: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """A copy of ``cfg`` whose detection head(s) predict ``num_classes`` classes."""
    out = copy.deepcopy(dict(cfg))
    for head in _class_heads(out):
        head["num_classes"] = num_classes
    return out


@contextlib.contextmanager
def _quiet_mmengine():
    """mmengine logs one INFO paragraph per initialised tensor; keep warnings only."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _total_losses(losses: Mapping[str, Any]) -> dict[str, Tensor]:
    """MMDetection's loss dict -> one scalar per term, reduced as its ``parse_losses`` does (``acc`` dropped)."""
    out: dict[str, Tensor] = {}
    for key, value in losses.items():
        if "loss" not in key:
            continue
        if isinstance(value, Tensor):
            out[key] = value.mean()
        else:
            out[key] = sum(v.mean() for v in value)
    return out


class MMDetDetector(nn.Module):
    """An MMDetection detector (``self.mm``) with detkd's detection interface and taps (see the module docstring)."""

    def __init__(self, *, mm: nn.Module, config: Mapping[str, Any], config_file: str | None = None) -> None:
        super().__init__()
        self.mm = mm
        self.config_file = config_file
        self.two_stage = hasattr(mm, "roi_head")
        head = mm.rpn_head if self.two_stage else getattr(mm, "bbox_head", None)
        generator = getattr(head, "prior_generator", None)
        if generator is None:
            raise ValueError(
                f"{type(mm).__name__}: detkd needs a dense single-stage head or an RPN (a prior generator "
                "gives each neck level its stride); DETR-style detectors are not supported"
            )
        if getattr(mm, "neck", None) is None:
            raise ValueError(f"{type(mm).__name__}: detkd distils the neck's pyramid; this config has no neck")
        strides = [int(s[0]) if isinstance(s, (tuple, list)) else int(s) for s in generator.strides]
        for stride in strides:
            if 2 ** round(math.log2(stride)) != stride:
                raise ValueError(f"{type(mm).__name__}: level stride {stride} is not a power of 2")
        self.level_names = [f"p{round(math.log2(s))}" for s in strides]
        self.strides = {name: s for name, s in zip(self.level_names, strides, strict=True)}
        self.out_channels = int(mm.neck.out_channels)
        self.size_divisible = max(32, max(strides))
        self.sigmoid_logits = bool(getattr(head, "use_sigmoid_cls", False))
        self.num_anchors = int(getattr(head, "num_base_priors", 1))
        pre = dict(config.get("data_preprocessor") or {})
        self.flip_channels = not (pre.get("bgr_to_rgb") or pre.get("rgb_to_bgr"))  # the net sees BGR unless flipped
        mean, std = pre.get("mean"), pre.get("std")
        self.register_buffer("pixel_mean", torch.tensor(mean or [0.0] * 3).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std or [1.0] * 3).view(3, 1, 1), persistent=False)

    @property
    def dense_head(self) -> nn.Module | None:
        """The single-stage head (not a second registration of it: the state dict keeps one name per tensor)."""
        return None if self.two_stage else self.mm.bbox_head

    @property
    def has_dense_logits(self) -> bool:
        """Single-stage heads with per-class sigmoid logits (RetinaNet, FCOS, ATSS, GFL, ...)."""
        return self.dense_head is not None and self.sigmoid_logits

    def prepare(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """[0, 1] RGB images -> the normalised, zero-padded batch the network sees, and each image's size."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        div = self.size_divisible
        height = math.ceil(max(h for h, _ in sizes) / div) * div
        width = math.ceil(max(w for _, w in sizes) / div) * div
        batch = images[0].new_zeros((len(images), 3, height, width))
        for i, image in enumerate(images):
            x = image * 255.0
            if self.flip_channels:
                x = x.flip(0)
            h, w = sizes[i]
            batch[i, :, :h, :w] = (x - self.pixel_mean) / self.pixel_std
        return batch, sizes

    def _samples(self, batch: Tensor, sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None):
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        padded = (int(batch.shape[-2]), int(batch.shape[-1]))
        samples = []
        for i, size in enumerate(sizes):
            sample = DetDataSample(
                metainfo=dict(
                    img_shape=size, ori_shape=size, pad_shape=padded, batch_input_shape=padded, scale_factor=(1.0, 1.0)
                )
            )
            if targets is not None:
                boxes = targets[i]["boxes"].to(batch.dtype).reshape(-1, 4)
                sample.gt_instances = InstanceData(bboxes=boxes, labels=targets[i]["labels"].long() - 1)
            samples.append(sample)
        return samples

    def pyramid(self, batch: Tensor) -> OrderedDict[str, Tensor]:
        """The neck's levels by name for a prepared batch."""
        return self.name_levels(self.mm.extract_feat(batch))

    def name_levels(self, feats: tuple[Tensor, ...] | list[Tensor]) -> OrderedDict[str, Tensor]:
        if len(feats) != len(self.level_names):
            raise ValueError(
                f"the neck gives {len(feats)} levels but the head's prior generator has {len(self.level_names)} strides"
            )
        return OrderedDict(zip(self.level_names, feats, strict=True))

    def dense_logits(self, pyramid: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """The single-stage head's class logits per level, (N, A*K, H, W)."""
        if not self.has_dense_logits:
            raise RuntimeError("this detector has no dense sigmoid class logits")
        outputs = self.dense_head(tuple(pyramid.values()))
        return self.name_levels(outputs[0])

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        batch, sizes = self.prepare(images)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return _total_losses(self.mm.loss(batch, self._samples(batch, sizes, targets)))
        results = self.mm.predict(batch, self._samples(batch, sizes, None), rescale=False)
        return [
            {
                "boxes": r.pred_instances.bboxes,
                "scores": r.pred_instances.scores,
                "labels": r.pred_instances.labels.long() + 1,
            }
            for r in results
        ]

    def set_thresholds(self, *, score_thresh: float, detections_per_img: int) -> None:
        """Score threshold and detection cap of the config's test_cfg (the second stage's for two-stage)."""
        test_cfg = self.mm.roi_head.test_cfg if self.two_stage else self.mm.bbox_head.test_cfg
        test_cfg.score_thr = score_thresh
        test_cfg.max_per_img = detections_per_img


def build_mmdet_detector(
    *, mmdet_config: Mapping[str, Any], num_classes: int | None = None, config_file: str | None = None
) -> MMDetDetector:
    """Build the ``model`` section of an MMDetection config (from :func:`read_mmdet_config`), no weights.

    ``num_classes`` (labels 1..K, background excluded) replaces the head's class count;
    ``None`` keeps the config's (a model-zoo teacher). Pretrained ``init_cfg`` entries are
    dropped (no downloads): weights come from local files (``detkd.models.checkpoint``).
    The result records ``detkd_config``, the keywords that rebuild it from a checkpoint alone.
    """
    import_mmdet()
    from mmdet.registry import MODELS
    from mmengine.config import Config

    plain = _plain(dict(mmdet_config), "mmdet_config")
    classes = config_classes(plain) if num_classes is None else int(num_classes)
    if classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {classes}")
    model_cfg = _drop_pretrained(with_classes(plain, classes))
    try:
        mm = MODELS.build(Config(dict(model=model_cfg)).model)
    except Exception as exc:  # the registry wraps constructor errors in many types
        where = config_file or "mmdet_config"
        raise ValueError(f"{where}: MMDetection cannot build this model: {type(exc).__name__}: {exc}") from None
    if not any(p.device.type == "meta" for p in mm.parameters()):
        with _quiet_mmengine():
            mm.init_weights()
    model = MMDetDetector(mm=mm, config=model_cfg, config_file=config_file)
    model.detkd_config = dict(arch="mmdet", num_classes=classes, mmdet_config=plain, config_file=config_file)
    return model
