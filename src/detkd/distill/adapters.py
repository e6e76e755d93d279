"""Student-side 1x1 channel adapters shared by the feature losses.

Adapters live inside the loss module and act on the student only, so they train with the
student and the frozen teacher never changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["adapt", "make_adapters"]


def make_adapters(
    levels: Sequence[str],
    student_channels: int,
    teacher_channels: int,
    *,
    force: bool = False,
) -> nn.ModuleDict:
    """One 1x1 conv (student -> teacher channels) per level when channels differ or ``force``.

    Returns an empty ``ModuleDict`` when no adapter is needed. A forced adapter between equal
    channel counts starts as the identity map, so switching it on does not change the initial
    loss; adapters between different channel counts use PyTorch's default init.
    """
    if student_channels < 1 or teacher_channels < 1:
        raise ValueError(f"channel counts must be >= 1, got {student_channels} and {teacher_channels}")
    adapters = nn.ModuleDict()
    if student_channels == teacher_channels and not force:
        return adapters
    for level in levels:
        conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        if student_channels == teacher_channels:
            with torch.no_grad():
                conv.weight.copy_(torch.eye(teacher_channels).view(teacher_channels, teacher_channels, 1, 1))
                conv.bias.zero_()
        adapters[level] = conv
    return adapters


def adapt(adapters: nn.ModuleDict, level: str, x: Tensor) -> Tensor:
    """Apply the adapter of ``level`` to the student feature ``x``, or return ``x`` if there is none."""
    return adapters[level](x) if level in adapters else x
