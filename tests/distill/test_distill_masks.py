"""Validity masks in every loss: padded cells never count, masked values equal the unpadded ones, SSIM in float32."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from detkd.distill import DSAMKDLoss, FeatureMSELoss, MGDLoss, MSADLoss, SSIMFeatureLoss
from detkd.distill import functional as Fd

LEVELS = ("p3", "p4")
MAP = {"p3": (12, 14), "p4": (6, 7)}
VALID = {"p3": [(12, 9), (7, 14)], "p4": [(6, 5), (4, 7)]}  # per sample (rows, cols), two window sizes at p3
N = 2

FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mse": lambda **kw: FeatureMSELoss(levels=LEVELS, **kw),
    "ssim": lambda **kw: SSIMFeatureLoss(levels=LEVELS, **kw),
    "mgd": lambda **kw: MGDLoss(levels=LEVELS, weight=1e-2, **kw),
    "msad": lambda **kw: MSADLoss(levels=LEVELS, ramp_iters=0, **kw),
    "dsamkd": lambda **kw: DSAMKDLoss(levels=LEVELS, feature_weight=1e-2, logit_weight=0.5, **kw),
}


def _masks() -> dict[str, torch.Tensor]:
    out = {}
    for lv, (h, w) in MAP.items():
        mask = torch.zeros(N, 1, h, w, dtype=torch.bool)
        for i, (r, c) in enumerate(VALID[lv]):
            mask[i, :, :r, :c] = True
        out[lv] = mask
    return out


def _maps(channels: int, seed: int, *, smooth: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for lv, (h, w) in MAP.items():
        x = torch.randn(N, channels, h, w, generator=gen) + 0.5
        if smooth:
            x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False) * 3
        out[lv] = x
    return out


def _crop(pyramid: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {lv: x[i : i + 1, :, : VALID[lv][i][0], : VALID[lv][i][1]] for lv, x in pyramid.items()}


def _call(loss: nn.Module, s, t, *, masks=None, logits=None) -> torch.Tensor:
    torch.manual_seed(0)  # MGD draws its mask from the global RNG
    kwargs = {} if logits is None else {"student_logits": logits[0], "teacher_logits": logits[1]}
    return sum(loss(s, t, masks=masks, **kwargs).values())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_padded_student_cells_change_neither_loss_nor_gradient(name: str) -> None:
    torch.manual_seed(0)
    loss = FACTORIES[name](student_channels=3, teacher_channels=4)
    masks = _masks()
    teacher = _maps(4, seed=1, smooth=True)
    base = _maps(3, seed=2)
    noise = _maps(3, seed=3)
    logits = (_maps(6, seed=4), _maps(6, seed=5)) if name == "dsamkd" else None
    values, grads = [], []
    for scale in (0.0, 100.0):
        student = {lv: (base[lv] + scale * noise[lv] * ~masks[lv]).requires_grad_() for lv in LEVELS}
        s_logits = None
        if logits is not None:
            s_logits = {lv: (logits[0][lv] + scale * noise[lv][:, :1] * ~masks[lv]).requires_grad_() for lv in LEVELS}
        value = _call(loss, student, teacher, masks=masks, logits=None if logits is None else (s_logits, logits[1]))
        value.backward()
        values.append(value.item())
        grads.append([student[lv].grad for lv in LEVELS] + ([s_logits[lv].grad for lv in LEVELS] if s_logits else []))
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert values[0] > 0
    for g_clean, g_noisy in zip(*grads, strict=True):
        torch.testing.assert_close(g_clean, g_noisy)
        assert g_clean.abs().sum() > 0
    for lv in LEVELS:  # exactly zero gradient on padded cells
        assert grads[0][LEVELS.index(lv)][~masks[lv].expand_as(base[lv])].abs().max() == 0


@pytest.mark.parametrize("name", list(FACTORIES))
def test_all_valid_mask_equals_no_mask(name: str) -> None:
    loss = FACTORIES[name](student_channels=4, teacher_channels=4)
    s, t = _maps(4, seed=1), _maps(4, seed=2, smooth=True)
    logits = (_maps(6, seed=4), _maps(6, seed=5)) if name == "dsamkd" else None
    ones = {lv: torch.ones(N, 1, *MAP[lv], dtype=torch.bool) for lv in LEVELS}
    assert _call(loss, s, t, masks=ones, logits=logits).item() == pytest.approx(
        _call(loss, s, t, logits=logits).item(), rel=1e-5
    )


def test_masked_mse_and_msad_are_means_over_valid_cells() -> None:
    s, t, masks = _maps(4, seed=1), _maps(4, seed=2), _masks()
    for lv in LEVELS:
        valid = masks[lv].expand_as(s[lv])
        expected = ((s[lv] - t[lv]) ** 2)[valid].mean()
        assert Fd.mse_loss(s[lv], t[lv], mask=masks[lv]).item() == pytest.approx(expected.item(), rel=1e-6)
    l1 = sum((s[lv] - t[lv]).abs()[masks[lv].expand_as(s[lv])].mean() for lv in LEVELS)
    assert Fd.msad_loss(s, t, masks=masks).item() == pytest.approx(0.6 * l1.item(), rel=1e-6)
    mse = FeatureMSELoss(levels=LEVELS, student_channels=4, teacher_channels=4)
    expected = sum(Fd.mse_loss(s[lv], t[lv], mask=masks[lv]) for lv in LEVELS) / 2
    assert mse(s, t, masks=masks)["mse"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_masked_ssim_equals_ssim_of_each_unpadded_region() -> None:
    """The masked loss is the per-sample loss of the valid region as an unpadded map (its own min-max,
    its own window: 9 and 7 at p3, where the map would allow 11) averaged over samples."""
    s, t, masks = _maps(4, seed=1), _maps(4, seed=2, smooth=True), _masks()
    for lv in LEVELS:
        expected = sum(Fd.ssim_loss(_crop(s, i)[lv], _crop(t, i)[lv]) for i in range(N)) / N
        assert Fd.ssim_loss(s[lv], t[lv], mask=masks[lv]).item() == pytest.approx(expected.item(), rel=1e-5)
    module = SSIMFeatureLoss(levels=LEVELS, student_channels=4, teacher_channels=4, weight=2.0)
    expected = 2.0 * sum(Fd.ssim_loss(s[lv], t[lv], mask=masks[lv]) for lv in LEVELS)
    assert module(s, t, masks=masks)["ssim"].item() == pytest.approx(expected.item(), rel=1e-6)
    holed = masks["p3"].clone()
    holed[0, 0, 0, 0] = False  # not a rectangle
    with pytest.raises(ValueError, match="rectangle"):
        Fd.ssim_loss(s["p3"], t["p3"], mask=holed)


def test_masked_generative_losses_equal_the_unpadded_regions() -> None:
    """MGD (no random drop) and DSAMKD sum over valid cells and see zeros beyond them, exactly like a
    3x3 conv's zero padding around each unpadded region: the batch value is the mean of the regions'."""
    s, t, masks = _maps(4, seed=1), _maps(4, seed=2, smooth=True), _masks()
    mgd = MGDLoss(levels=LEVELS, student_channels=4, teacher_channels=4, weight=0.1, mask_ratio=0.0)
    expected = sum(mgd(_crop(s, i), _crop(t, i))["mgd"] for i in range(N)) / N
    assert mgd(s, t, masks=masks)["mgd"].item() == pytest.approx(expected.item(), rel=1e-5)
    dsamkd = DSAMKDLoss(levels=LEVELS, student_channels=4, teacher_channels=4, kernel_sizes=(1,), mask_ratio=0.5)
    zs, zt = _maps(6, seed=4), _maps(6, seed=5)
    crops = [(_crop(s, i), _crop(t, i), _crop(zs, i), _crop(zt, i)) for i in range(N)]
    feature = sum(dsamkd.feature_loss(si, ti) for si, ti, _, _ in crops) / N
    logit = sum(dsamkd.logit_loss(zsi, zti) for _, _, zsi, zti in crops) / N
    assert dsamkd.feature_loss(s, t, masks).item() == pytest.approx(feature.item(), rel=1e-5)
    assert dsamkd.logit_loss(zs, zt, masks).item() == pytest.approx(logit.item(), rel=1e-5)


def test_masked_attention_and_top_mask_use_valid_cells_only() -> None:
    from detkd.distill.dsamkd import spatial_attention, top_attention_mask

    t = torch.randn(2, 3, 6, 6)
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    mask[0, :, :4, :5] = True  # 20 valid cells
    mask[1, :, :6, :3] = True  # 18 valid cells
    t[:, :, 5, 5] = 100.0  # a padded peak in both samples
    a = spatial_attention(t, 0.5, mask=mask)
    assert a[~mask].abs().max() == 0
    for i in range(2):
        assert a[i][mask[i]].mean().item() == pytest.approx(1.0, rel=1e-5)
    keep = top_attention_mask(a, 0.5, mask=mask)
    assert (keep[~mask] == 0).all()  # padded cells are never kept
    dropped = (keep == 0) & mask
    assert dropped.flatten(1).sum(1).tolist() == [10, 9]  # floor(0.5 * valid cells)
    for i in range(2):  # the dropped cells are the most attended valid ones
        valid_a = a[i][mask[i]]
        assert a[i][dropped[i]].min() >= valid_a.sort(descending=True).values[int(dropped[i].sum()) - 1]


def test_ssim_is_float32_under_bf16_autocast() -> None:
    """bf16 moments have a variance error as large as C2: the loss must compute in float32 anyway."""
    gen = torch.Generator().manual_seed(0)
    blur = torch.ones(8, 1, 3, 3) / 9
    t = torch.nn.functional.conv2d(torch.randn(2, 8, 24, 24, generator=gen), blur, padding=1, groups=8)
    s = 0.7 * t + 0.3 * torch.randn(2, 8, 24, 24, generator=gen)
    mask = torch.ones(2, 1, 24, 24, dtype=torch.bool)
    mask[1, :, 20:] = False
    module = SSIMFeatureLoss(levels=("p3",), student_channels=8, teacher_channels=16)  # with an adapter conv
    t16 = {"p3": torch.cat([t, t], dim=1)}
    reference = (Fd.ssim_loss(s, t), Fd.ssim_loss(s, t, mask=mask), module({"p3": s}, t16)["ssim"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = (Fd.ssim_loss(s, t), Fd.ssim_loss(s, t, mask=mask), module({"p3": s}, t16)["ssim"])
        bf16_inputs = Fd.ssim_loss(s.bfloat16(), t.bfloat16())
    for ref, got in zip(reference, autocast, strict=True):
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(ref.item(), abs=1e-4)
    assert bf16_inputs.dtype == torch.float32
    assert bf16_inputs.item() == pytest.approx(
        Fd.ssim_loss(s.bfloat16().float(), t.bfloat16().float()).item(), abs=1e-6
    )


def test_cached_window_first_built_in_inference_mode_still_trains() -> None:
    x = torch.rand(1, 2, 9, 9)
    with torch.inference_mode():
        Fd.ssim_loss(x, x, window_size=9, sigma=1.23)  # builds and caches this window
    s = torch.rand(1, 2, 9, 9, requires_grad=True)
    Fd.ssim_loss(s, x, window_size=9, sigma=1.23).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
