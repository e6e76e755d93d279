"""Read a detector's FPN pyramid and dense class logits without changing its outputs.

Two ways in, for detkd's torchvision detectors, ``MMDetDetector`` and ``HFDetector`` alike:
``DetectorTaps`` records what an ordinary ``model(images, targets)``
call computes (the student: detection loss and distillation features from ONE
forward pass), and ``extract_features`` runs only the parts a teacher needs
(transform, backbone, classification head) with no box decoding or NMS.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet

from detkd.models.detectors import dense_class_logits, unwrap_model
from detkd.models.hf_detector import HFDetector
from detkd.models.mmdet_detector import MMDetDetector
from detkd.models.multiscale import MultiScaleDetector
from detkd.models.vit_teacher import ViTFeatureTeacher


def dense_logits_by_level(dense: Tensor, pyramid: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
    """torchvision's (N, sum(H*W*A), K) class logits -> level name -> (N, A*K, H, W)."""
    n, total, k = dense.shape
    locations = sum(f.shape[-2] * f.shape[-1] for f in pyramid.values())
    anchors = total // locations
    out: OrderedDict[str, Tensor] = OrderedDict()
    start = 0
    for name, feat in pyramid.items():
        h, w = feat.shape[-2:]
        count = h * w * anchors
        chunk = dense[:, start : start + count]  # ordered (h, w, a)
        out[name] = chunk.reshape(n, h, w, anchors, k).permute(0, 3, 4, 1, 2).reshape(n, anchors * k, h, w)
        start += count
    return out


def has_dense_logits(model: nn.Module) -> bool:
    """One-stage detectors (FCOS, RetinaNet, MMDetection's sigmoid dense heads) have dense class logits;
    two-stage ones and the multi-scale teacher do not."""
    model = unwrap_model(model)
    if isinstance(model, MMDetDetector):
        return model.has_dense_logits
    return isinstance(model, (FCOS, RetinaNet))  # not HFDetector: a DETR's classes come from object queries


def logit_layout(model: nn.Module) -> tuple[int, bool]:
    """(anchors per location, whether each anchor's K class logits are preceded by a background slot).

    detkd's torchvision heads predict K + 1 sigmoid logits with slot 0 for background (never a
    target); MMDetection's sigmoid heads predict the K classes only.
    """
    model = unwrap_model(model)
    if isinstance(model, MMDetDetector):
        return model.num_anchors, False
    return int(model.anchor_generator.num_anchors_per_location()[0]), True


def foreground_logits(logits: Tensor, anchors: int) -> Tensor:
    """(N, A*(K+1), H, W) logits with a background slot -> (N, A*K, H, W) without it."""
    n, channels, h, w = logits.shape
    return logits.reshape(n, anchors, channels // anchors, h, w)[:, :, 1:].reshape(n, -1, h, w)


class DetectorTaps:
    """Context manager: ``with DetectorTaps(model) as taps: out = model(x)``.

    After the call, ``taps.pyramid`` maps "p3".. to (N, C, H, W) tensors (of the
    padded batch) and, for RetinaNet/FCOS, ``taps.class_logits`` maps the same
    level names to (N, A*K, H, W) logits (K includes the background slot).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap_model(model)
        self.pyramid: OrderedDict[str, Tensor] = OrderedDict()
        self._dense_logits: Tensor | None = None
        self._level_logits: OrderedDict[str, Tensor] | None = None
        self._handles: list = []

    def __enter__(self) -> DetectorTaps:
        if isinstance(self.model, HFDetector):
            self._handles.extend(self.model.capture(self._on_hf_encoder))
            return self
        if isinstance(self.model, MMDetDetector):
            self._handles.append(self.model.mm.neck.register_forward_hook(self._on_neck))
            if self.model.has_dense_logits:
                self._handles.append(self.model.dense_head.register_forward_hook(self._on_dense_head))
            return self
        self._handles.append(self.model.backbone.register_forward_hook(self._on_backbone))
        if has_dense_logits(self.model):
            self._handles.append(self.model.head.register_forward_hook(self._on_head))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_backbone(self, module, inputs, output) -> None:
        self.pyramid = OrderedDict(output)

    def _on_head(self, module, inputs, output: dict[str, Tensor]) -> None:
        self._dense_logits = output["cls_logits"]  # torchvision's RetinaNet and FCOS heads (and detkd's lite head)

    def _on_neck(self, module, inputs, output) -> None:
        self.pyramid = self.model.name_levels(output)

    def _on_dense_head(self, module, inputs, output) -> None:
        self._level_logits = self.model.name_levels(output[0])  # (cls_scores, bbox_preds, ...) per level

    def _on_hf_encoder(self, pyramid: OrderedDict[str, Tensor]) -> None:
        self.pyramid = pyramid  # the encoder's multi-scale maps; a DETR has no dense class logits

    @property
    def has_logits(self) -> bool:
        return self._dense_logits is not None or self._level_logits is not None

    @property
    def class_logits(self) -> OrderedDict[str, Tensor]:
        if self._level_logits is not None:
            return self._level_logits
        if self._dense_logits is None:
            raise RuntimeError("this detector has no dense class logits (two-stage) or no forward ran yet")
        return dense_logits_by_level(self._dense_logits, self.pyramid)


@dataclass
class Features:
    pyramid: OrderedDict[str, Tensor]
    class_logits: OrderedDict[str, Tensor] | None


def extract_features(model: nn.Module, images: list[Tensor], *, logits: bool = True) -> Features:
    """A teacher's pyramid (the fused one for a multi-scale teacher) and, when ``logits`` and the model
    has them, its dense class logits; no box decoding. The class head is ~40% of a tiny FCOS forward,
    so feature-only losses skip it."""
    model = unwrap_model(model)
    if isinstance(model, MultiScaleDetector):
        return Features(model.fused_pyramid(images), None)
    if isinstance(model, (HFDetector, ViTFeatureTeacher)):
        return Features(model.pyramid(images), None)
    if isinstance(model, MMDetDetector):
        pyramid = model.pyramid(model.prepare(images)[0])
        return Features(pyramid, model.dense_logits(pyramid) if logits and model.has_dense_logits else None)
    image_list, _ = model.transform(images)
    pyramid = OrderedDict(model.backbone(image_list.tensors))
    dense = None
    if logits and has_dense_logits(model):
        dense = dense_logits_by_level(dense_class_logits(model.head, list(pyramid.values())), pyramid)
    return Features(pyramid, dense)
