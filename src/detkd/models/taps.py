"""Read a detector's FPN pyramid and dense class logits without changing its outputs.

Two ways in: ``DetectorTaps`` records what an ordinary ``model(images, targets)``
call computes (the student: detection loss and distillation features from ONE
forward pass), and ``extract_features`` runs only the parts a teacher needs
(transform, backbone, classification head) with no box decoding or NMS.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet

from detkd.models.detectors import unwrap_model
from detkd.models.multiscale import MultiScaleDetector


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
    """One-stage detectors (FCOS, RetinaNet) have dense class logits; Faster R-CNN and the multi-scale teacher not."""
    return isinstance(unwrap_model(model), (FCOS, RetinaNet))


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
        self._handles: list = []

    def __enter__(self) -> DetectorTaps:
        self._handles.append(self.model.backbone.register_forward_hook(self._on_backbone))
        if has_dense_logits(self.model):
            self._handles.append(self.model.head.classification_head.register_forward_hook(self._on_logits))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_backbone(self, module, inputs, output) -> None:
        self.pyramid = OrderedDict(output)

    def _on_logits(self, module, inputs, output: Tensor) -> None:
        self._dense_logits = output

    @property
    def has_logits(self) -> bool:
        return self._dense_logits is not None

    @property
    def class_logits(self) -> OrderedDict[str, Tensor]:
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
    image_list, _ = model.transform(images)
    pyramid = OrderedDict(model.backbone(image_list.tensors))
    dense = None
    if logits and has_dense_logits(model):
        dense = dense_logits_by_level(model.head.classification_head(list(pyramid.values())), pyramid)
    return Features(pyramid, dense)
