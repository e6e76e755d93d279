"""MSAD's warm-up ramp and level selection (the weight copy is tested in tests/models)."""

from __future__ import annotations

import pytest
import torch
from factories import random_pyramid

from detkd.distill import MSADLoss, msad_loss


def _pyramids() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"p2": (2, 4, 8, 8), "p3": (2, 4, 4, 4)}
    return random_pyramid(shapes, generator=gen), random_pyramid(shapes, generator=gen)


def test_msad_ramp() -> None:
    s, t = _pyramids()
    loss = MSADLoss(levels=("p2", "p3"), student_channels=4, teacher_channels=4)
    full = msad_loss(s, t, alpha=0.2, temperature=3.0).item()
    assert full > 0
    assert loss(s, t, step=0)["msad"].item() == pytest.approx(full / 500, rel=1e-6)
    assert loss(s, t, step=249)["msad"].item() == pytest.approx(full / 2, rel=1e-6)
    assert loss(s, t, step=499)["msad"].item() == pytest.approx(full, rel=1e-6)
    assert loss(s, t, step=10_000)["msad"].item() == pytest.approx(full, rel=1e-6)
    assert loss(s, t)["msad"].item() == pytest.approx(full / 500, rel=1e-6)  # step defaults to 0
    no_ramp = MSADLoss(levels=("p2", "p3"), student_channels=4, teacher_channels=4, ramp_iters=0)
    assert no_ramp(s, t, step=0, student_logits=None)["msad"].item() == pytest.approx(full, rel=1e-6)
    with pytest.raises(ValueError):
        MSADLoss(levels=("p2",), student_channels=4, teacher_channels=4, ramp_iters=-1)


def test_msad_uses_only_its_levels_and_adapters() -> None:
    s, t = _pyramids()
    loss = MSADLoss(levels=("p3",), student_channels=4, teacher_channels=4, alpha=1.0, temperature=1.0, ramp_iters=0)
    assert loss(s, t)["msad"].item() == pytest.approx((s["p3"] - t["p3"]).abs().mean().item(), rel=1e-6)
    adapted = MSADLoss(levels=("p3",), student_channels=2, teacher_channels=4, ramp_iters=0)
    assert list(adapted.adapters) == ["p3"]
    s2 = {"p3": s["p3"][:, :2]}
    expected = 0.6 * (adapted.adapters["p3"](s2["p3"]) - t["p3"]).abs().mean()
    assert adapted(s2, t)["msad"].item() == pytest.approx(expected.item(), rel=1e-6)
