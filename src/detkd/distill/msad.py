"""MSAD: multi-scale aligned distillation for low-resolution detection (student side).

The low-resolution student's pyramid (shifted by one level, see ``pair_levels``) imitates the
frozen multi-scale teacher's fused features with an L1 loss,
alpha * T * sum_l mean |S_l - F_l|, ramped in linearly over the first ``ramp_iters`` steps so
the imitation does not swamp the detection loss early on. ``copy_matching_weights`` covers
"initialise the student from the teacher when shapes match" (and MTPD's neck/head copy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from detkd.distill.adapters import adapt, check_pyramids, make_adapters
from detkd.distill.functional import msad_loss

__all__ = ["MSADLoss", "copy_matching_weights"]


class MSADLoss(nn.Module):
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
        super().__init__()
        if not levels:
            raise ValueError("MSADLoss needs at least one level")
        if ramp_iters < 0:
            raise ValueError(f"ramp_iters must be >= 0, got {ramp_iters}")
        self.levels = tuple(levels)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.ramp_iters = int(ramp_iters)
        self.adapters = make_adapters(self.levels, student_channels, teacher_channels)

    def ramp(self, step: int) -> float:
        """min(1, (step + 1) / ramp_iters); 1 when ramping is off (ramp_iters == 0)."""
        if self.ramp_iters <= 0:
            return 1.0
        return min(1.0, (max(int(step), 0) + 1) / self.ramp_iters)

    def forward(
        self, student: dict[str, Tensor], teacher: dict[str, Tensor], *, step: int = 0, **_: object
    ) -> dict[str, Tensor]:
        check_pyramids(self.levels, student, teacher)
        s = {lv: adapt(self.adapters, lv, student[lv]) for lv in self.levels}
        t = {lv: teacher[lv].detach() for lv in self.levels}
        value = msad_loss(s, t, alpha=self.alpha, temperature=self.temperature, ramp=self.ramp(step))
        return {"msad": value}


def copy_matching_weights(
    target: nn.Module,
    source_state: Mapping[str, Tensor],
    *,
    prefixes: Sequence[str] | None = None,
) -> list[str]:
    """Copy every tensor of ``source_state`` whose key exists in ``target`` with the same shape.

    With ``prefixes``, only keys starting with one of them are considered (e.g.
    ``("backbone.fpn.", "head.")`` to copy a teacher's neck and head). Everything else in
    ``target`` is left as it was. Returns the copied keys in ``source_state`` order.
    """
    target_state = target.state_dict()
    chosen: dict[str, Tensor] = {}
    for key, value in source_state.items():
        if prefixes is not None and not any(key.startswith(p) for p in prefixes):
            continue
        current = target_state.get(key)
        if current is not None and isinstance(value, Tensor) and current.shape == value.shape:
            chosen[key] = value
    if chosen:
        with torch.no_grad():
            target.load_state_dict(chosen, strict=False)
    return list(chosen)
