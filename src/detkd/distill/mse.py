"""Plain feature MSE: the baseline every distillation comparison needs.

``LevelDistanceLoss`` is the shape it shares with the paper-free ``cosine`` loss: a distance
between the adapted student map and the teacher map per paired level, over valid cells,
averaged over levels and weighted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from detkd.distill.adapters import adapt, make_adapters
from detkd.distill.base import DistillLoss, Masks, Pyramid, check_pyramids, level_mask
from detkd.distill.functional import mse_loss

__all__ = ["FeatureMSELoss", "LevelDistanceLoss"]


class LevelDistanceLoss(DistillLoss):
    """weight * mean over levels of ``distance(adapter(S_l), T_l)`` over valid cells, returned as ``{term: ...}``.

    Subclasses set ``term``, ``distance`` and whether an adapter is always there (``force_adapters``;
    otherwise only where the channels differ).
    """

    term: str
    distance: Callable[..., Tensor]
    force_adapters: bool = False

    def __init__(self, *, levels: Sequence[str], student_channels: int, teacher_channels: int, weight: float = 1.0):
        super().__init__(levels=levels)
        self.weight = float(weight)
        self.adapters = make_adapters(self.levels, student_channels, teacher_channels, force=self.force_adapters)

    @classmethod
    def from_config(
        cls, cfg: Any, *, levels: Sequence[str], student_channels: int, teacher_channels: int
    ) -> LevelDistanceLoss:
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
        distance = type(self).distance
        terms = [
            distance(adapt(self.adapters, lv, student[lv]), teacher[lv].detach(), mask=level_mask(masks, lv))
            for lv in self.levels
        ]
        return {self.term: self.weight * sum(terms) / len(terms)}


class FeatureMSELoss(LevelDistanceLoss):
    """weight * mean over levels of MSE(adapter(S_l), T_l) over valid cells; adapters only when channels differ."""

    term = "mse"
    distance = staticmethod(mse_loss)
