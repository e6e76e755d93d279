"""Structural (SSIM) feature distillation.

L = weight * sum_l mean_c (1 - SSIM(psi(phi(S_l)), psi(T_l))) / 2 with psi the per-sample,
per-channel min-max normalisation and phi an optional 1x1 adapter. SSIM compares local
means, contrasts and correlations, so the student is pushed to reproduce the teacher's
structure rather than each activation value, which beats L1/L2 feature losses in the paper.
The whole loss (adapter included) runs in float32 with autocast off: in bf16 the error of
the local variances is as large as SSIM's constant C2.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from detkd.config import SSIMConfig
from detkd.distill.adapters import adapt, make_adapters
from detkd.distill.base import DistillLoss, Masks, Pyramid, check_pyramids, level_mask
from detkd.distill.functional import at_least_float32, full_precision, ssim_loss

__all__ = ["SSIMFeatureLoss"]


class SSIMFeatureLoss(DistillLoss):
    """Sum over levels of the SSIM feature loss, times ``weight`` (lambda, 2..4 in the paper).

    ``adapter=True`` adds a 1x1 adapter even for equal channel counts (starting at identity);
    the paper finds it helps only across architectures. Channels that differ always get one.
    Padded cells (``masks``) never count; see ``functional.ssim_loss`` for how.
    """

    def __init__(
        self,
        *,
        levels: Sequence[str],
        student_channels: int,
        teacher_channels: int,
        weight: float = 3.0,
        adapter: bool = False,
        window_size: int = 11,
        sigma: float = 1.5,
    ) -> None:
        super().__init__(levels=levels)
        if window_size < 1 or window_size % 2 == 0:
            raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
        self.weight = float(weight)
        self.window_size = int(window_size)
        self.sigma = float(sigma)
        self.adapters = make_adapters(self.levels, student_channels, teacher_channels, force=adapter)

    @classmethod
    def from_config(
        cls, cfg: SSIMConfig, *, levels: Sequence[str], student_channels: int, teacher_channels: int
    ) -> SSIMFeatureLoss:
        return cls(
            levels=levels,
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            weight=cfg.weight,
            adapter=cfg.adapter,
            window_size=cfg.window_size,
            sigma=cfg.sigma,
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
        with full_precision(student[self.levels[0]]):
            total = sum(
                ssim_loss(
                    adapt(self.adapters, lv, at_least_float32(student[lv])),
                    teacher[lv].detach(),
                    self.window_size,
                    self.sigma,
                    mask=level_mask(masks, lv),
                )
                for lv in self.levels
            )
        return {"ssim": self.weight * total}
