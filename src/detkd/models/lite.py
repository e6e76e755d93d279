"""The ``lite`` FCOS design: a low-resolution student built for CPU deployment.

At half resolution a student whose pyramid is shifted down one level (P2 at 64 px pairs with
the teacher's P3 at 128 px) runs its head on feature maps of the teacher's size, so with the
teacher's head it costs what the teacher costs (``benchmarks/results/latency.md``). The lite
design cuts that cost where it is, without dropping P2 (small objects need it):

* every 3x3 conv of the head tower and of the FPN's output convs is depthwise-separable
  (3x3 depthwise + 1x1 pointwise: ~8x fewer multiply-adds at 64 channels);
* the classification and box branches share one tower (FCOS predicts both from it), so the
  tower runs once per level instead of twice;
* the tower normalises with BatchNorm, one per pyramid level (EfficientDet's shared-weights,
  per-level-statistics head): an exported graph folds it into the convs, where GroupNorm
  would stay a runtime reduction.

The predictors are FCOS's (3x3 convs, torchvision's initialisation), and the head returns
torchvision's output dict, so FCOS's loss, post-processing and detkd's taps are unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork

DESIGNS = ("standard", "lite")
FOREGROUND_PRIOR = 0.01  # torchvision's FCOS classification bias: initial foreground probability


def separable_conv(channels: int, *, bias: bool) -> nn.Sequential:
    """3x3 depthwise then 1x1 pointwise, channels in = out (no activation between: one linear map)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
        nn.Conv2d(channels, channels, 1, bias=bias),
    )


class SharedSeparableTower(nn.Module):
    """``num_convs`` separable conv + BatchNorm + ReLU layers; convs shared by all levels, BatchNorm per level."""

    def __init__(self, channels: int, *, num_convs: int, num_levels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(separable_conv(channels, bias=False) for _ in range(num_convs))
        # norms[level][layer]: a level's statistics never mix with another level's (a shared BatchNorm's
        # running stats would average P2 and P6 and fit neither at eval)
        self.norms = nn.ModuleList(
            nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_convs)) for _ in range(num_levels)
        )

    def forward(self, x: Tensor, level: int) -> Tensor:
        for index, norms in enumerate(self.norms):  # TorchScript indexes ModuleLists only in loops
            if index == level:
                for conv, norm in zip(self.convs, norms):  # noqa: B905 (TorchScript's zip has no strict=)
                    x = torch.relu(norm(conv(x)))
        return x


class LiteFCOSHead(FCOSHead):
    """FCOS head over a :class:`SharedSeparableTower`; same outputs and loss as torchvision's ``FCOSHead``."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, *, num_convs: int, num_levels: int) -> None:
        nn.Module.__init__(self)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.num_levels = num_levels
        self.tower = SharedSeparableTower(channels, num_convs=num_convs, num_levels=num_levels)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        # softplus before FCOS's ReLU on the distances, as detkd's standard FCOS head (see detectors.fcos_head)
        self.bbox_reg = nn.Sequential(nn.Conv2d(channels, num_anchors * 4, 3, padding=1), nn.Softplus())
        self.bbox_ctrness = nn.Conv2d(channels, num_anchors, 3, padding=1)
        for conv in (self.cls_logits, self.bbox_reg[0], self.bbox_ctrness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - FOREGROUND_PRIOR) / FOREGROUND_PRIOR))

    def level_outputs(self, x: list[Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per level, maps (N, A*K, H, W) class logits, (N, A*4, H, W) box distances, (N, A, H, W) centerness."""
        if len(x) != self.num_levels:
            raise ValueError(f"this lite head was built for {self.num_levels} pyramid levels, got {len(x)}")
        out: list[tuple[Tensor, Tensor, Tensor]] = []
        for level, features in enumerate(x):
            tower = self.tower(features, level)
            out.append((self.cls_logits(tower), torch.relu(self.bbox_reg(tower)), self.bbox_ctrness(tower)))
        return out

    def class_logits(self, x: list[Tensor]) -> Tensor:
        """(N, sum HWA, K) class logits alone (what a teacher's logit distillation reads)."""
        out = []
        for level, features in enumerate(x):
            out.append(_dense(self.cls_logits(self.tower(features, level)), self.num_classes))
        return torch.cat(out, dim=1)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        logits, distances, centerness = [], [], []
        for cls, reg, ctr in self.level_outputs(x):
            logits.append(_dense(cls, self.num_classes))
            distances.append(_dense(reg, 4))
            centerness.append(_dense(ctr, 1))
        return {
            "cls_logits": torch.cat(logits, dim=1),
            "bbox_regression": torch.cat(distances, dim=1),
            "bbox_ctrness": torch.cat(centerness, dim=1),
        }


def _dense(maps: Tensor, values: int) -> Tensor:
    """(N, A*V, H, W) -> (N, H*W*A, V): torchvision's per-location layout."""
    n, _, h, w = maps.shape
    return maps.view(n, -1, values, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, values)


def make_fpn_separable(fpn: FeaturePyramidNetwork) -> None:
    """Replace the FPN's 3x3 output convs with separable ones (in place; the 1x1 lateral convs stay)."""
    for block in fpn.layer_blocks:
        conv = block[0]
        block[0] = separable_conv(conv.out_channels, bias=conv.bias is not None)
