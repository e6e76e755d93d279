"""Feature cosine distance: the paper-free option for teachers whose feature scale says nothing.

A vision transformer's patch tokens (DINOv2, DINOv3) and a CNN student's pyramid live on
unrelated scales; MSE against them mostly teaches magnitudes. The cosine distance compares
directions only: weight * mean over levels and valid cells of 1 - cos(adapter(S), T), the
adapter (always there: it maps the student's channels onto the teacher's) trained with the
student.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from detkd.config import CosineConfig
from detkd.distill.adapters import adapt, make_adapters
from detkd.distill.base import DistillLoss, Masks, Pyramid, check_pyramids, level_mask
from detkd.distill.functional import cosine_distance

__all__ = ["FeatureCosineLoss"]


class FeatureCosineLoss(DistillLoss):
    """weight * mean over levels of the mean cosine distance of adapter(S_l) and T_l over valid cells."""

    def __init__(self, *, levels: Sequence[str], student_channels: int, teacher_channels: int, weight: float = 1.0):
        super().__init__(levels=levels)
        self.weight = float(weight)
        self.adapters = make_adapters(self.levels, student_channels, teacher_channels, force=True)

    @classmethod
    def from_config(
        cls, cfg: CosineConfig, *, levels: Sequence[str], student_channels: int, teacher_channels: int
    ) -> FeatureCosineLoss:
        return cls(
            levels=levels, student_channels=student_channels, teacher_channels=teacher_channels, weight=cfg.weight
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
        terms = [
            cosine_distance(adapt(self.adapters, lv, student[lv]), teacher[lv].detach(), mask=level_mask(masks, lv))
            for lv in self.levels
        ]
        return {"cosine": self.weight * sum(terms) / len(terms)}
