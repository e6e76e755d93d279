"""What every distillation loss module looks like to the Distiller.

A loss is called as ``loss(student, teacher, masks=..., step=..., student_logits=...,
teacher_logits=...)`` with pyramids (level name -> (N, C, H, W)) already paired and aligned on
the student's grid, and returns a dict of named, already-weighted scalar terms. ``masks`` maps
a level to its (N, 1, H, W) validity mask (True/1 = a cell of the image, False/0 = batch
padding); a level that is missing (or ``masks=None``) is valid everywhere. Each loss says
whether it needs dense class logits (``uses_logits``), so the Distiller collects logits only
when some loss does and never needs to know losses by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["DistillLoss", "Masks", "Pyramid", "check_pyramids", "level_mask"]

Pyramid = Mapping[str, Tensor]
Masks = Mapping[str, Tensor]


class DistillLoss(nn.Module):
    """Base class: the call signature and the ``uses_logits`` declaration the Distiller relies on."""

    def __init__(self, *, levels: Sequence[str]) -> None:
        super().__init__()
        if not levels:
            raise ValueError(f"{type(self).__name__} needs at least one level")
        self.levels = tuple(levels)

    @property
    def uses_logits(self) -> bool:
        """True when ``forward`` needs ``student_logits`` and ``teacher_logits`` (dense one-stage heads)."""
        return False

    @classmethod
    def from_config(
        cls, cfg: Any, *, levels: Sequence[str], student_channels: int, teacher_channels: int
    ) -> DistillLoss:
        """Build the loss from its ``detkd.config`` section (each subclass maps its fields explicitly)."""
        raise NotImplementedError

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
        raise NotImplementedError


def level_mask(masks: Masks | None, level: str) -> Tensor | None:
    """The validity mask of ``level``, or None when all its cells are valid."""
    return None if masks is None else masks.get(level)


def check_pyramids(levels: Sequence[str], student: Pyramid, teacher: Pyramid, masks: Masks | None = None) -> None:
    """Raise a ValueError naming the level when a pyramid lacks it or the N, H, W (or its mask's) differ."""
    for level in levels:
        if level not in student or level not in teacher:
            raise ValueError(f"level {level!r} missing: student has {sorted(student)}, teacher has {sorted(teacher)}")
        s, t = student[level], teacher[level]
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0] or s.shape[-2:] != t.shape[-2:]:
            raise ValueError(
                f"level {level!r}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must be "
                "(N, C, H, W) with the same N, H, W (pair and align levels first)"
            )
        mask = level_mask(masks, level)
        if mask is not None and (mask.dim() != 4 or tuple(mask.shape) != (s.shape[0], 1, *s.shape[-2:])):
            raise ValueError(f"level {level!r}: mask {tuple(mask.shape)} must be (N, 1, H, W) for {tuple(s.shape)}")
