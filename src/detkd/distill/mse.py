"""Plain feature MSE: the baseline every distillation comparison needs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from detkd.config import MSEConfig
from detkd.distill.adapters import adapt, make_adapters
from detkd.distill.base import DistillLoss, Masks, Pyramid, check_pyramids, level_mask
from detkd.distill.functional import mse_loss

__all__ = ["FeatureMSELoss"]


class FeatureMSELoss(DistillLoss):
    """weight * mean over levels of MSE(adapter(S_l), T_l) over valid cells; adapters only when channels differ."""

    def __init__(
        self,
        *,
        levels: Sequence[str],
        student_channels: int,
        teacher_channels: int,
        weight: float = 1.0,
    ) -> None:
        super().__init__(levels=levels)
        self.weight = float(weight)
        self.adapters = make_adapters(self.levels, student_channels, teacher_channels)

    @classmethod
    def from_config(
        cls, cfg: MSEConfig, *, levels: Sequence[str], student_channels: int, teacher_channels: int
    ) -> FeatureMSELoss:
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
            mse_loss(adapt(self.adapters, lv, student[lv]), teacher[lv].detach(), mask=level_mask(masks, lv))
            for lv in self.levels
        ]
        return {"mse": self.weight * sum(terms) / len(terms)}
