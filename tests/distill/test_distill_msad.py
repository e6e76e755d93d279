"""MSAD's warm-up ramp and the teacher-to-student weight copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detkd.distill import MSADLoss, copy_matching_weights, msad_loss


def _pyramids() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    s = {"p2": torch.randn(2, 4, 8, 8, generator=gen), "p3": torch.randn(2, 4, 4, 4, generator=gen)}
    t = {"p2": torch.randn(2, 4, 8, 8, generator=gen), "p3": torch.randn(2, 4, 4, 4, generator=gen)}
    return s, t


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


class _Net(nn.Module):
    def __init__(self, head_out: int) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 8, 3)
        self.neck = nn.Conv2d(8, 8, 1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, head_out, 1)


def test_copy_matching_weights_copies_exactly_matching_shapes() -> None:
    torch.manual_seed(0)
    target, source = _Net(head_out=4), _Net(head_out=6)
    source.norm.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = dict(source.state_dict())
    state["extra.weight"] = torch.ones(3)  # not in the target
    copied = copy_matching_weights(target, state)
    expected = [k for k in source.state_dict() if not k.startswith("head.")]
    assert copied == expected
    after = target.state_dict()
    for key in expected:
        assert torch.equal(after[key], state[key]), key
    for key in ("head.weight", "head.bias"):  # shape differs: untouched
        assert torch.equal(after[key], before[key])


def test_copy_matching_weights_with_prefixes() -> None:
    torch.manual_seed(0)
    target, source = _Net(head_out=6), _Net(head_out=6)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    copied = copy_matching_weights(target, source.state_dict(), prefixes=("neck.", "head."))
    assert copied == ["neck.weight", "neck.bias", "head.weight", "head.bias"]
    after = target.state_dict()
    for key, value in after.items():
        ref = source.state_dict()[key] if key in copied else before[key]
        assert torch.equal(value, ref), key
    assert copy_matching_weights(target, source.state_dict(), prefixes=("nothing.",)) == []
    # copied parameters stay trainable leaves of the target
    assert all(p.requires_grad and p.is_leaf for p in target.parameters())
