"""Read a detector's FPN pyramid and dense class logits without changing its outputs.

Forward hooks record what the backbone (pyramid) and the one-stage classification
head (logits) produce during an ordinary ``model(images, targets)`` call, so the
detection loss and the distillation features come from ONE forward pass.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class DetectorTaps:
    """Context manager: ``with DetectorTaps(model) as taps: out = model(x)``.

    After the call, ``taps.pyramid`` maps "p3".. to (N, C, H, W) tensors (of the
    padded batch) and, for RetinaNet/FCOS, ``taps.class_logits`` maps the same
    level names to (N, A*K, H, W) logits (K includes the background slot).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = getattr(model, "module", model)
        self.pyramid: OrderedDict[str, Tensor] = OrderedDict()
        self._dense_logits: Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> DetectorTaps:
        self._handles.append(self.model.backbone.register_forward_hook(self._on_backbone))
        head = getattr(self.model, "head", None)
        if head is not None and hasattr(head, "classification_head"):
            self._handles.append(head.classification_head.register_forward_hook(self._on_logits))
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
        """Per-level logits reshaped back to (N, A*K, H, W) from torchvision's (N, HWA, K)."""
        if self._dense_logits is None:
            raise RuntimeError("this detector has no dense class logits (two-stage) or no forward ran yet")
        dense = self._dense_logits
        n, _, k = dense.shape
        out: OrderedDict[str, Tensor] = OrderedDict()
        start = 0
        for name, feat in self.pyramid.items():
            h, w = feat.shape[-2:]
            count = dense.shape[1] // sum(f.shape[-2] * f.shape[-1] for f in self.pyramid.values()) * h * w
            a = count // (h * w)
            chunk = dense[:, start:start + count]  # (N, H*W*A, K), ordered h, w, a
            out[name] = chunk.reshape(n, h, w, a, k).permute(0, 3, 4, 1, 2).reshape(n, a * k, h, w)
            start += count
        return out
