"""Masked generative distillation (MGD), the per-stage loss of multi-teacher progressive distillation.

Instead of imitating the teacher pixel by pixel, the student feature is randomly masked and a
small generator must rebuild the full teacher feature from what is left, which forces the
student's features to carry the teacher's information in a recoverable form.
L = weight * sum_l sum((G_l(S'_l * M) - T_l)^2) / N.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkd.config import MGDConfig
from detkd.distill.adapters import adapt, make_adapters
from detkd.distill.base import DistillLoss, Masks, Pyramid, check_pyramids, level_mask

__all__ = ["MGDLoss", "generate", "make_generator"]


def make_generator(channels: int) -> nn.Sequential:
    """conv3x3 -> ReLU -> conv3x3 at the teacher's channel count (MGD's generation block)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
    )


def generate(generator: nn.Sequential, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Run a generation block; with a validity ``mask`` (N, 1, H, W) the hidden activations are zeroed
    on padded cells too, so each sample's valid region is rebuilt exactly as the same region alone
    (zero-padded by the convs) would be, however much padding its batch added."""
    if mask is None:
        return generator(x)
    inside = mask.to(x.dtype)
    layers = list(generator)
    for layer in layers[:-1]:
        x = layer(x * inside)
    return layers[-1](x * inside)


class MGDLoss(DistillLoss):
    """MGD over several pyramid levels; one align conv (if channels differ) and one generator per level.

    Defaults are the paper's RetinaNet setting (alpha 2e-5, lambda 0.65); Mask R-CNN uses
    5e-7 and 0.45. The mask is drawn from torch's global RNG on every call: a position is
    dropped with probability ``mask_ratio``, the same position for all channels. Padded cells
    (``masks``) are dropped too (so the generator never sees them) and the sum runs over valid
    cells only.
    """

    def __init__(
        self,
        *,
        levels: Sequence[str],
        student_channels: int,
        teacher_channels: int,
        weight: float = 2e-5,
        mask_ratio: float = 0.65,
    ) -> None:
        super().__init__(levels=levels)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.weight = float(weight)
        self.mask_ratio = float(mask_ratio)
        self.align = make_adapters(self.levels, student_channels, teacher_channels)
        self.generators = nn.ModuleDict({lv: make_generator(teacher_channels) for lv in self.levels})

    @classmethod
    def from_config(
        cls, cfg: MGDConfig, *, levels: Sequence[str], student_channels: int, teacher_channels: int
    ) -> MGDLoss:
        return cls(
            levels=levels,
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            weight=cfg.weight,
            mask_ratio=cfg.mask_ratio,
        )

    def forward(
        self,
        student: Pyramid,
        teacher: Pyramid,
        *,
        masks: Masks | None = None,
        step: int = 0,
        student_logits: Pyramid | None = None,
        teacher_logits: Pyramid | None = None,
    ) -> dict[str, Tensor]:
        check_pyramids(self.levels, student, teacher, masks)
        total = student[self.levels[0]].new_zeros(())
        for lv in self.levels:
            s = adapt(self.align, lv, student[lv])
            t = teacher[lv].detach()
            n, _, h, w = s.shape
            keep = torch.rand(n, 1, h, w, device=s.device) >= self.mask_ratio
            valid = level_mask(masks, lv)
            error = (generate(self.generators[lv], s * keep.to(s.dtype), valid) - t) ** 2
            if valid is not None:
                error = error * valid.to(error.dtype)
            total = total + error.sum() / n
        return {"mgd": self.weight * total}
