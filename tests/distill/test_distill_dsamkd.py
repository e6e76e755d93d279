"""DSAMKD (our interpretation): attention pyramid, adaptive mask, feature value, logit branch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factories import random_pyramid

from detkd.distill import DSAMKDLoss
from detkd.distill.dsamkd import attention_pyramid, spatial_attention, top_attention_mask


def _features(seed: int, c: int = 4, n: int = 2, s: int = 8) -> dict[str, torch.Tensor]:
    return random_pyramid({"p3": (n, c, s, s), "p4": (n, c, s // 2, s // 2)}, seed=seed)


def _logits(seed: int, n: int = 2, ch: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"p3": torch.randn(n, ch, 8, 8, generator=gen) * 2, "p4": torch.randn(n, ch, 4, 4, generator=gen) * 2}


def test_attention_is_mean_one_and_peaks_where_teacher_is_strong() -> None:
    t = torch.zeros(2, 3, 6, 6)
    t[0, :, 1, 2] = 5.0
    t[1, :, 4, 4] = -5.0  # |T|: the sign does not matter
    a = spatial_attention(t, temperature=0.5)
    assert a.shape == (2, 1, 6, 6)
    assert torch.allclose(a.mean(dim=(2, 3)), torch.ones(2, 1))
    assert a[0, 0].argmax().item() == 1 * 6 + 2 and a[1, 0].argmax().item() == 4 * 6 + 4
    a1, a3, a5 = attention_pyramid(a, (1, 3, 5))
    assert torch.equal(a1, a)
    assert a3.shape == a.shape and a5.shape == a.shape
    assert torch.equal(a3, F.max_pool2d(a, 3, stride=1, padding=1))
    assert (a3[0, 0] == a[0, 0].max()).sum().item() == 9  # the peak spreads over a 3x3 region
    keep = top_attention_mask(a3, 0.25)
    assert keep.shape == (2, 1, 6, 6)
    assert (keep == 0).flatten(1).sum(1).tolist() == [9, 9]  # floor(0.25 * 36)
    assert keep[0, 0, 0:3, 1:4].eq(0).all() and keep[1, 0, 3:6, 3:6].eq(0).all()


def test_feature_value_matches_hand_computation() -> None:
    torch.manual_seed(0)
    loss = DSAMKDLoss(
        levels=("p3",),
        student_channels=4,
        teacher_channels=4,
        feature_weight=0.1,
        logit_weight=0.0,
        kernel_sizes=(1, 3),
        mask_ratio=0.5,
        attention_temperature=0.5,
    )
    s, t = _features(1), _features(2)
    out = loss(s, t)
    assert set(out) == {"dsamkd_feature"}  # logit key omitted when logit_weight == 0
    a = spatial_attention(t["p3"], 0.5)
    expected = 0.0
    with torch.no_grad():
        for k, gen in zip((1, 3), loss.generators["p3"], strict=True):
            a_k = F.max_pool2d(a, k, stride=1, padding=k // 2)
            flat = a_k.flatten(1)
            keep = torch.ones_like(flat)
            keep.scatter_(1, flat.topk(32, dim=1).indices, 0.0)  # 50 % of 64 positions
            masked = s["p3"] * keep.view(2, 1, 8, 8)
            w = a_k / a_k.mean(dim=(2, 3), keepdim=True)
            expected += (w * (gen(masked) - t["p3"]) ** 2).sum().item() / 2
    assert out["dsamkd_feature"].item() == pytest.approx(0.1 * expected, rel=1e-5)


def test_logit_branch_zero_when_logits_agree_and_positive_otherwise() -> None:
    loss = DSAMKDLoss(levels=("p3", "p4"), student_channels=4, teacher_channels=4, logit_temperature=2.0)
    s, t = _features(1), _features(2)
    z = _logits(3)
    out = loss(s, t, student_logits={k: v.clone() for k, v in z.items()}, teacher_logits=z)
    assert set(out) == {"dsamkd_feature", "dsamkd_logit"}
    assert out["dsamkd_logit"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss(s, t, student_logits=_logits(4), teacher_logits=z)["dsamkd_logit"].item() > 1e-3


def test_logit_value_matches_hand_computation() -> None:
    temp, lw = 2.0, 0.7
    loss = DSAMKDLoss(
        levels=("p3", "p4"), student_channels=4, teacher_channels=4, logit_weight=lw, logit_temperature=temp
    )
    zs, zt = _logits(5), _logits(6)
    total = 0.0
    for lv in ("p3", "p4"):
        ps = torch.sigmoid(zs[lv].double() / temp)
        pt = torch.sigmoid(zt[lv].double() / temp)
        w = (pt - ps).abs().sum(1)  # (N, H, W)
        w = w / w.sum(dim=(1, 2), keepdim=True)
        bce = -(pt * ps.log() + (1 - pt) * (1 - ps).log())
        ent = -(pt * pt.log() + (1 - pt) * (1 - pt).log())
        total += (w * (bce - ent).mean(1)).sum(dim=(1, 2)).mean().item()  # KL = BCE - teacher entropy
    got = loss.logit_loss(zs, zt).item() * lw
    assert got == pytest.approx(lw * temp**2 * total, rel=1e-5)


def test_logit_branch_trains_student_logits() -> None:
    torch.manual_seed(0)
    loss = DSAMKDLoss(levels=("p3", "p4"), student_channels=4, teacher_channels=4, feature_weight=0.0)
    zt = _logits(7)
    zs = {k: torch.nn.Parameter(v) for k, v in _logits(8).items()}
    opt = torch.optim.Adam(zs.values(), lr=0.1)
    s, t = _features(1), _features(2)
    values = []
    for _ in range(30):
        value = loss(s, t, student_logits=dict(zs), teacher_logits=zt)["dsamkd_logit"]
        values.append(value.item())
        opt.zero_grad()
        value.backward()
        opt.step()
    assert values[-1] < 0.5 * values[0]
    assert all(v.grad is not None for v in zs.values())


def test_logit_errors() -> None:
    loss = DSAMKDLoss(levels=("p3", "p4"), student_channels=4, teacher_channels=4)
    s, t = _features(1), _features(2)
    with pytest.raises(ValueError, match=r"one-stage.*logit_weight=0"):
        loss(s, t)
    with pytest.raises(ValueError, match="one-stage"):
        loss(s, t, student_logits=_logits(1))
    bad = _logits(2)
    bad["p4"] = bad["p4"][:, :3]
    with pytest.raises(ValueError, match=r"'p4'.*\(2, 6, 4, 4\).*\(2, 3, 4, 4\)"):
        loss(s, t, student_logits=_logits(1), teacher_logits=bad)
    with pytest.raises(ValueError, match="p4"):
        loss(s, t, student_logits=_logits(1), teacher_logits={"p3": _logits(2)["p3"]})
    for kwargs in ({"kernel_sizes": (2,)}, {"kernel_sizes": ()}, {"mask_ratio": 1.0}, {"attention_temperature": 0.0}):
        with pytest.raises(ValueError):
            DSAMKDLoss(levels=("p3",), student_channels=4, teacher_channels=4, **kwargs)


def test_generators_are_per_level_and_scale() -> None:
    loss = DSAMKDLoss(levels=("p3", "p4"), student_channels=3, teacher_channels=4, kernel_sizes=(1, 3, 5))
    assert set(loss.generators) == {"p3", "p4"} and all(len(g) == 3 for g in loss.generators.values())
    ids = {id(m) for g in loss.generators.values() for m in g}
    assert len(ids) == 6
    assert set(loss.align) == {"p3", "p4"}
