"""MSAD: multi-scale aligned distillation for low-resolution detection (student side).

The low-resolution student's pyramid (shifted by one level, see ``pair_levels``) imitates the
frozen multi-scale teacher's fused features with an L1 loss,
alpha * T * sum_l mean |S_l - F_l|, ramped in linearly over the first ``ramp_iters`` steps so
the imitation does not swamp the detection loss early on. Initialising the student from the
teacher is ``detkd.models.copy_matching_weights``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from detkd.config import MSADConfig
from detkd.distill.adapters import adapt, make_adapters
from detkd.distill.base import DistillLoss, Masks, Pyramid, check_pyramids
from detkd.distill.functional import msad_loss

__all__ = ["MSADLoss"]


class MSADLoss(DistillLoss):
    """MSAD feature imitation with a linear warm-up; a 1x1 adapter per level only if channels differ."""

    def __init__(
        self,
        *,
        levels: Sequence[str],
        student_channels: int,
        teacher_channels: int,
        alpha: float = 0.2,
        temperature: float = 3.0,
        ramp_iters: int = 500,
    ) -> None:
        super().__init__(levels=levels)
        if ramp_iters < 0:
            raise ValueError(f"ramp_iters must be >= 0, got {ramp_iters}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.ramp_iters = int(ramp_iters)
        self.adapters = make_adapters(self.levels, student_channels, teacher_channels)

    @classmethod
    def from_config(
        cls, cfg: MSADConfig, *, levels: Sequence[str], student_channels: int, teacher_channels: int
    ) -> MSADLoss:
        return cls(
            levels=levels,
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            alpha=cfg.alpha,
            temperature=cfg.temperature,
            ramp_iters=cfg.ramp_iters,
        )

    def ramp(self, step: int) -> float:
        """min(1, (step + 1) / ramp_iters); 1 when ramping is off (ramp_iters == 0)."""
        if self.ramp_iters <= 0:
            return 1.0
        return min(1.0, (max(int(step), 0) + 1) / self.ramp_iters)

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
        s = {lv: adapt(self.adapters, lv, student[lv]) for lv in self.levels}
        t = {lv: teacher[lv].detach() for lv in self.levels}
        value = msad_loss(s, t, alpha=self.alpha, temperature=self.temperature, ramp=self.ramp(step), masks=masks)
        return {"msad": value}
