"""MSAD's aligned multi-scale teacher: one network, two resolutions, fused pyramid.

The same backbone, FPN and head run on the high-resolution input and on its
exactly downsampled copy. Because the low-resolution copy is 2**k times smaller,
its level P(l-k) has the spatial size of the high-resolution P(l); one crossing
feature-level fusion (C-FF) module, shared by all levels, mixes each aligned pair, and the fused
pyramid goes through the shared head as a third branch. Training loss:
L_hr + L_lr + fused_loss_weight * L_fused; prediction uses the fused branch.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator

from detkd.data.transforms import scale_batch


class CrossFeatureFusion(nn.Module):
    """C-FF as in MSAD's reference code: GAP(concat(F_hr, F_lr)) -> FC -> ReLU -> FC -> softmax over the 2 inputs.

    One module serves every level (the reference shares it too): FC 2C -> 2C/16 -> 2, both without
    bias, initialised like detectron2's ``c2_xavier_fill``. Each sample and level gets its own pair
    (the reference's active line applies the first sample's pair to the whole batch; its
    commented-out per-sample line is what is done here).
    """

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, 2 * channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(2 * channels, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, 2, bias=False)
        )
        for layer in (self.fc[0], self.fc[2]):
            nn.init.kaiming_uniform_(layer.weight, a=1)

    def weights(self, high: Tensor, low: Tensor) -> Tensor:
        """(N, 2) fusion weights, positive and summing to one."""
        pooled = torch.cat([high, low], dim=1).mean(dim=(2, 3))
        return torch.softmax(self.fc(pooled), dim=1)

    def forward(self, high: Tensor, low: Tensor) -> tuple[Tensor, Tensor]:
        """(fused feature, its (N, 2) weights)."""
        if low.shape[-2:] != high.shape[-2:]:  # odd input sizes: padding may differ by one cell
            low = F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=False)
        w = self.weights(high, low)
        return w[:, 0, None, None, None] * high + w[:, 1, None, None, None] * low, w


def level_shift(low_res_scale: float) -> int:
    """k for a low-resolution branch at scale 1/2**k; anything else cannot be aligned by level."""
    shift = -math.log2(low_res_scale) if 0 < low_res_scale < 1 else 0.5
    if abs(shift - round(shift)) > 1e-6:
        raise ValueError(f"low_res_scale must be 1/2**k (0.5, 0.25, ...), got {low_res_scale}")
    return int(round(shift))


class MultiScaleDetector(nn.Module):
    """Wrap a one-stage torchvision detector whose pyramid spans P(min_level - k)..P(max_level).

    ``last_fusion_weights`` maps each level to the (N, 2) C-FF weights of the last forward pass.
    """

    def __init__(
        self,
        detector: nn.Module,
        *,
        min_level: int,
        max_level: int,
        anchor_sizes: list[list[float]],
        low_res_scale: float = 0.5,
        fused_loss_weight: float = 0.4,
        low_res_transform: nn.Module,
    ) -> None:
        super().__init__()
        if not isinstance(detector, (FCOS, RetinaNet)):
            raise ValueError("the multi-scale (MSAD) teacher needs a one-stage detector (FCOS or RetinaNet)")
        self.shift = level_shift(low_res_scale)
        self.detector = detector
        self.low_res_transform = low_res_transform
        self.min_level, self.max_level = min_level, max_level
        self.low_res_scale = low_res_scale
        self.fused_loss_weight = fused_loss_weight
        self.fusion = CrossFeatureFusion(detector.backbone.out_channels)
        ratios = (1.0,) if isinstance(detector, FCOS) else (0.5, 1.0, 2.0)
        self.high_anchors = AnchorGenerator(tuple(tuple(s) for s in anchor_sizes), (ratios,) * len(anchor_sizes))
        self.low_anchors = AnchorGenerator(
            tuple(tuple(v * low_res_scale for v in s) for s in anchor_sizes), (ratios,) * len(anchor_sizes)
        )
        self.last_fusion_weights: dict[str, Tensor] = {}

    # The distiller and evaluation code read these like any detector's.
    @property
    def backbone(self) -> nn.Module:
        return self.detector.backbone

    @property
    def strides(self) -> dict[str, int]:
        return {f"p{lvl}": 2**lvl for lvl in range(self.min_level, self.max_level + 1)}

    def _pyramids(self, images: list[Tensor], targets=None):
        # The low-resolution view is derived from the same (augmented) batch, boxes scaled exactly.
        carried = targets if targets is not None else [{"boxes": torch.zeros(0, 4, device=i.device)} for i in images]
        low_images, low_targets = scale_batch(images, carried, factor=self.low_res_scale)
        if targets is None:
            low_targets = None
        high_list, high_targets = self.detector.transform(images, targets)
        low_list, low_targets = self.low_res_transform(low_images, low_targets)
        high_all = self.detector.backbone(high_list.tensors)
        low_all = self.detector.backbone(low_list.tensors)
        high = OrderedDict((f"p{lvl}", high_all[f"p{lvl}"]) for lvl in range(self.min_level, self.max_level + 1))
        low = OrderedDict(
            (f"p{lvl}", low_all[f"p{lvl - self.shift}"]) for lvl in range(self.min_level, self.max_level + 1)
        )
        fused = OrderedDict()
        for name in high:
            fused[name], weights = self.fusion(high[name], low[name])
            self.last_fusion_weights[name] = weights.detach()
        return (high_list, high_targets, high), (low_list, low_targets, low), fused

    def fused_pyramid(self, images: list[Tensor]) -> OrderedDict[str, Tensor]:
        """The fused teacher pyramid (named by high-resolution level) used for distillation."""
        _, _, fused = self._pyramids(images)
        return fused

    def _head(self, image_list, features: list[Tensor], targets, anchors_gen: AnchorGenerator):
        det = self.detector
        outputs = det.head(features)
        anchors = anchors_gen(image_list, features)
        hw = [f.size(2) * f.size(3) for f in features]
        per_location = outputs["cls_logits"].size(1) // sum(hw)
        counts = [n * per_location for n in hw]
        if self.training:
            if isinstance(det, FCOS):
                return det.compute_loss(targets, outputs, anchors, counts)
            return det.compute_loss(targets, outputs, anchors)
        split_outputs = {k: list(v.split(counts, dim=1)) for k, v in outputs.items()}
        split_anchors = [list(a.split(counts)) for a in anchors]
        return det.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        (high_list, high_targets, high), (low_list, low_targets, low), fused = self._pyramids(images, targets)
        if not self.training:
            return self._head(high_list, list(fused.values()), None, self.high_anchors)
        losses: dict[str, Tensor] = {}
        for key, value in self._head(high_list, list(high.values()), high_targets, self.high_anchors).items():
            losses[f"high_{key}"] = value
        # the low branch is scored at its own resolution with its own (scaled) anchors
        for key, value in self._head(low_list, list(low.values()), low_targets, self.low_anchors).items():
            losses[f"low_{key}"] = value
        for key, value in self._head(high_list, list(fused.values()), high_targets, self.high_anchors).items():
            losses[f"fused_{key}"] = self.fused_loss_weight * value
        return losses
