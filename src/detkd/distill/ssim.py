"""Structural (SSIM) feature distillation.

L = weight * sum_l mean_c (1 - SSIM(psi(phi(S_l)), psi(T_l))) / 2 with psi the per-sample,
per-channel min-max normalisation and phi an optional 1x1 adapter. SSIM compares local
means, contrasts and correlations, so the student is pushed to reproduce the teacher's
structure rather than each activation value, which beats L1/L2 feature losses in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detkd.distill.adapters import adapt, check_pyramids, make_adapters
from detkd.distill.functional import ssim_loss

__all__ = ["SSIMFeatureLoss"]


class SSIMFeatureLoss(nn.Module):
    """Sum over levels of the SSIM feature loss, times ``weight`` (lambda, 2..4 in the paper).

    ``adapter=True`` adds a 1x1 adapter even for equal channel counts (starting at identity);
    the paper finds it helps only across architectures. Channels that differ always get one.
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
        super().__init__()
        if not levels:
            raise ValueError("SSIMFeatureLoss needs at least one level")
        if window_size < 1 or window_size % 2 == 0:
            raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
        self.levels = tuple(levels)
        self.weight = float(weight)
        self.window_size = int(window_size)
        self.sigma = float(sigma)
        self.adapters = make_adapters(self.levels, student_channels, teacher_channels, force=adapter)

    def forward(self, student: dict[str, Tensor], teacher: dict[str, Tensor], **_: object) -> dict[str, Tensor]:
        check_pyramids(self.levels, student, teacher)
        total = sum(
            ssim_loss(adapt(self.adapters, lv, student[lv]), teacher[lv].detach(), self.window_size, self.sigma)
            for lv in self.levels
        )
        return {"ssim": self.weight * total}
