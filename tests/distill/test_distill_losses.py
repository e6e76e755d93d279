"""Shared numeric checks for every feature loss module: minimum at agreement, descent, gradient routing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from factories import random_pyramid
from torch import nn

from detkd.distill import DSAMKDLoss, FeatureMSELoss, MGDLoss, MSADLoss, SSIMFeatureLoss
from detkd.distill.functional import ssim_loss

LEVELS = ("p3", "p4")
SIZES = {"p3": 12, "p4": 6}

Factory = Callable[..., nn.Module]

FACTORIES: dict[str, tuple[Factory, str]] = {
    "mse": (lambda **kw: FeatureMSELoss(levels=LEVELS, **kw), "mse"),
    "ssim": (lambda **kw: SSIMFeatureLoss(levels=LEVELS, window_size=5, **kw), "ssim"),
    "mgd": (lambda **kw: MGDLoss(levels=LEVELS, weight=1e-2, **kw), "mgd"),
    "msad": (lambda **kw: MSADLoss(levels=LEVELS, ramp_iters=0, **kw), "msad"),
    "dsamkd": (lambda **kw: DSAMKDLoss(levels=LEVELS, feature_weight=1e-2, logit_weight=0.0, **kw), "dsamkd_feature"),
}


def pyramid(channels: int, *, seed: int, n: int = 2, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    shapes = {lv: (n, channels, s, s) for lv, s in SIZES.items()}
    return random_pyramid(shapes, seed=seed, offset=0.5, requires_grad=requires_grad)


def smooth_teacher(channels: int, *, seed: int, n: int = 2) -> dict[str, torch.Tensor]:
    """Spatially smooth teacher maps (real features are smooth; SSIM of white noise hardly moves)."""
    raw = pyramid(channels, seed=seed, n=n)
    blur = torch.ones(channels, 1, 3, 3) / 9
    return {lv: torch.nn.functional.conv2d(x, blur, padding=1, groups=channels) * 3 for lv, x in raw.items()}


def set_identity_generators(module: nn.Module) -> None:
    """conv3x3 -> ReLU -> conv3x3 set to the identity map on non-negative inputs."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            with torch.no_grad():
                m.weight.zero_()
                m.bias.zero_()
                for c in range(m.out_channels):
                    m.weight[c, c, 1, 1] = 1.0


@pytest.mark.parametrize("name", ["mse", "ssim", "msad"])
def test_zero_when_student_equals_teacher(name: str) -> None:
    factory, key = FACTORIES[name]
    loss = factory(student_channels=4, teacher_channels=4)
    assert len(list(loss.parameters())) == 0  # equal channels, no adapter
    t = pyramid(4, seed=0)
    s = {k: v.clone() for k, v in t.items()}
    assert loss(s, t)[key].item() == pytest.approx(0.0, abs=1e-6)
    s_off = pyramid(4, seed=1)
    assert loss(s_off, t)[key].item() > 1e-2


@pytest.mark.parametrize("name", ["mgd", "dsamkd"])
def test_generative_losses_reach_zero_without_mask_and_identity_generator(name: str) -> None:
    """Their minimum, 0, is reached by S == T when nothing is masked and each generator is the identity.

    (With masking the generator must hallucinate the dropped positions, so no student reaches 0;
    the loss is a sum of squares, so 0 is the minimum.) Non-negative features keep the ReLU exact.
    """
    factory, key = FACTORIES[name]
    loss = factory(student_channels=4, teacher_channels=4, mask_ratio=0.0)
    set_identity_generators(loss)
    t = {k: v.abs() for k, v in pyramid(4, seed=0).items()}
    s = {k: v.clone() for k, v in t.items()}
    assert loss(s, t)[key].item() == pytest.approx(0.0, abs=1e-9)
    assert loss({k: v * 1.1 for k, v in s.items()}, t)[key].item() > 1e-4
    # masking makes the identity generator miss the dropped positions: the loss is no longer 0
    masked = factory(student_channels=4, teacher_channels=4, mask_ratio=0.5)
    set_identity_generators(masked)
    assert masked(s, t)[key].item() > 1e-3


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("channels", [(4, 4), (3, 5)])
def test_loss_falls_when_student_is_trained(name: str, channels: tuple[int, int]) -> None:
    torch.manual_seed(0)
    factory, key = FACTORIES[name]
    c_s, c_t = channels
    loss = factory(student_channels=c_s, teacher_channels=c_t)
    teacher = smooth_teacher(c_t, seed=1)
    student = nn.ParameterDict({k: nn.Parameter(v) for k, v in pyramid(c_s, seed=2).items()})
    params = list(student.parameters()) + list(loss.parameters())
    opt = torch.optim.Adam(params, lr=0.05)
    values = []
    for _ in range(40):
        value = loss(dict(student.items()), teacher)[key]
        values.append(value.item())
        opt.zero_grad()
        value.backward()
        opt.step()
    assert values[-1] < 0.5 * values[0], (name, values[0], values[-1])


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("channels", [(4, 4), (3, 5)])
def test_gradients_reach_student_and_module_but_not_teacher(name: str, channels: tuple[int, int]) -> None:
    torch.manual_seed(0)
    factory, key = FACTORIES[name]
    c_s, c_t = channels
    loss = factory(student_channels=c_s, teacher_channels=c_t)
    if c_s != c_t:
        assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in loss.modules())
    student = pyramid(c_s, seed=3, requires_grad=True)
    teacher = pyramid(c_t, seed=4)
    greedy_teacher = pyramid(c_t, seed=4, requires_grad=True)  # contract violation must not leak grads
    outsider = nn.Linear(2, 2)
    out = loss(student, greedy_teacher)
    assert set(out) == {key}
    assert out[key].dim() == 0
    assert torch.allclose(out[key], loss(student, teacher)[key]) or name in ("mgd",)  # mgd draws a fresh mask
    out[key].backward()
    for lv in LEVELS:
        assert student[lv].grad is not None and student[lv].grad.abs().sum() > 0
        assert greedy_teacher[lv].grad is None
        assert teacher[lv].grad is None
    for pname, p in loss.named_parameters():
        assert p.grad is not None, pname
    assert all(p.grad is None for p in outsider.parameters())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_missing_or_mismatched_level_raises(name: str) -> None:
    factory, _ = FACTORIES[name]
    loss = factory(student_channels=4, teacher_channels=4)
    t = pyramid(4, seed=0)
    with pytest.raises(ValueError, match="p4"):
        loss({"p3": t["p3"]}, t)
    with pytest.raises(ValueError, match="p3"):
        loss({"p3": t["p3"][:, :, :5], "p4": t["p4"]}, t)


def test_mse_value_and_adapter() -> None:
    t = pyramid(5, seed=0)
    s = pyramid(5, seed=1)
    loss = FeatureMSELoss(levels=LEVELS, student_channels=5, teacher_channels=5, weight=2.0)
    expected = 2.0 * sum(((s[k] - t[k]) ** 2).mean() for k in LEVELS) / 2
    assert loss(s, t)["mse"].item() == pytest.approx(expected.item(), rel=1e-6)
    adapted = FeatureMSELoss(levels=LEVELS, student_channels=3, teacher_channels=5)
    assert set(adapted.adapters) == set(LEVELS)
    s3 = pyramid(3, seed=1)
    expected = sum(((adapted.adapters[k](s3[k]) - t[k]) ** 2).mean() for k in LEVELS) / 2
    assert adapted(s3, t)["mse"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_ssim_module_value_and_forced_identity_adapter() -> None:
    t = smooth_teacher(4, seed=0)
    s = pyramid(4, seed=1)
    plain = SSIMFeatureLoss(levels=LEVELS, student_channels=4, teacher_channels=4)
    expected = 3.0 * sum(ssim_loss(s[k], t[k]) for k in LEVELS)
    assert plain(s, t)["ssim"].item() == pytest.approx(expected.item(), rel=1e-6)
    forced = SSIMFeatureLoss(levels=LEVELS, student_channels=4, teacher_channels=4, adapter=True, weight=2.0)
    assert set(forced.adapters) == set(LEVELS)  # starts as identity: same value as without adapter
    assert forced(s, t)["ssim"].item() == pytest.approx(expected.item() * 2.0 / 3.0, rel=1e-5)


def test_mgd_value_and_mask_ratio() -> None:
    loss = MGDLoss(levels=("p3",), student_channels=4, teacher_channels=4, weight=0.5, mask_ratio=0.65)
    seen: list[torch.Tensor] = []
    loss.generators["p3"][0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    gen = torch.Generator().manual_seed(0)
    s = {"p3": torch.rand(8, 4, 32, 32, generator=gen) + 0.1}  # strictly positive: zeros come from the mask
    t = {"p3": torch.randn(8, 4, 32, 32, generator=gen)}
    torch.manual_seed(0)
    value = loss(s, t)["mgd"]
    masked_input = seen[0]
    dropped = (masked_input == 0).all(dim=1)  # the same positions are dropped in every channel
    assert torch.equal(dropped, (masked_input == 0).any(dim=1))
    assert dropped.float().mean().item() == pytest.approx(0.65, abs=0.02)
    keep = (~dropped).unsqueeze(1).float()
    assert torch.equal(masked_input, s["p3"] * keep)
    with torch.no_grad():
        expected = 0.5 * ((loss.generators["p3"](masked_input) - t["p3"]) ** 2).sum() / 8
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.manual_seed(0)  # the mask comes from torch's global RNG: reseeding reproduces it
    assert loss(s, t)["mgd"].item() == value.item()
    with pytest.raises(ValueError):
        MGDLoss(levels=("p3",), student_channels=4, teacher_channels=4, mask_ratio=1.0)
