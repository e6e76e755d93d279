"""Plain feature MSE: the baseline every distillation comparison needs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detkd.distill.adapters import adapt, check_pyramids, make_adapters
from detkd.distill.functional import mse_loss

__all__ = ["FeatureMSELoss"]


class FeatureMSELoss(nn.Module):
    """weight * mean over levels of MSE(adapter(S_l), T_l); adapters only when channels differ."""

    def __init__(
        self,
        *,
        levels: Sequence[str],
        student_channels: int,
        teacher_channels: int,
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not levels:
            raise ValueError("FeatureMSELoss needs at least one level")
        self.levels = tuple(levels)
        self.weight = float(weight)
        self.adapters = make_adapters(self.levels, student_channels, teacher_channels)

    def forward(self, student: dict[str, Tensor], teacher: dict[str, Tensor], **_: object) -> dict[str, Tensor]:
        check_pyramids(self.levels, student, teacher)
        terms = [mse_loss(adapt(self.adapters, lv, student[lv]), teacher[lv].detach()) for lv in self.levels]
        return {"mse": self.weight * sum(terms) / len(terms)}
