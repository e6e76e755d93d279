"""Numbers for the functional API: SSIM against scikit-image, level pairing, MSAD loss, resizing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d
from skimage.metrics import structural_similarity

from detkd.distill import functional as Fd


def _skimage_loss(student: torch.Tensor, teacher: torch.Tensor, win_size: int = 11) -> float:
    """(1 - SSIM) / 2 averaged over samples and channels, each plane scored by scikit-image."""
    xs = Fd.minmax_normalize(student).double().numpy()
    ys = Fd.minmax_normalize(teacher).double().numpy()
    values = [
        structural_similarity(
            xs[n, c],
            ys[n, c],
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            win_size=win_size,
        )
        for n in range(xs.shape[0])
        for c in range(xs.shape[1])
    ]
    return float(np.mean([(1 - v) / 2 for v in values]))


def test_minmax_normalize_maps_each_plane_to_unit_range() -> None:
    x = torch.randn(2, 3, 5, 7) * 4 + 2
    y = Fd.minmax_normalize(x)
    assert torch.allclose(y.flatten(2).amin(2), torch.zeros(2, 3))
    assert torch.allclose(y.flatten(2).amax(2), torch.ones(2, 3), atol=1e-5)
    assert torch.equal(Fd.minmax_normalize(torch.full((1, 2, 3, 3), 5.0)), torch.zeros(1, 2, 3, 3))


def test_gaussian_window_is_normalised_and_separable() -> None:
    w = Fd.gaussian_window(11, 1.5, dtype=torch.float64)
    assert w.shape == (11, 11)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))
    g = torch.exp(-0.5 * (torch.arange(11, dtype=torch.float64) - 5) ** 2 / 1.5**2)
    assert torch.allclose(w, torch.outer(g, g) / torch.outer(g, g).sum())
    with pytest.raises(ValueError):
        Fd.gaussian_window(4, 1.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssim_loss_matches_skimage(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 24, 24, generator=gen, dtype=torch.float64)
    t = 0.6 * s + 0.4 * torch.randn(2, 3, 24, 24, generator=gen, dtype=torch.float64)  # correlated, SSIM ~ 0.5
    ours = Fd.ssim_loss(s.to(dtype), t.to(dtype)).item()
    ref = _skimage_loss(s, t)
    assert 0.05 < ref < 0.45
    assert ours == pytest.approx(ref, abs=1e-5)


def test_ssim_map_matches_skimage_full_map_crop() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 20, 17, generator=gen, dtype=torch.float64)
    y = torch.rand(1, 1, 20, 17, generator=gen, dtype=torch.float64)
    _, full = structural_similarity(
        x[0, 0].numpy(),
        y[0, 0].numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )
    ours = Fd.ssim_map(x, y)[0, 0].numpy()
    assert ours.shape == (10, 7)
    np.testing.assert_allclose(ours, full[5:-5, 5:-5], atol=1e-10)


def test_ssim_loss_zero_for_identical_and_symmetric() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 4, 16, 16, generator=gen)
    b = torch.randn(2, 4, 16, 16, generator=gen)
    assert Fd.ssim_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert Fd.ssim_loss(a, b).item() == pytest.approx(Fd.ssim_loss(b, a).item(), abs=1e-7)
    # psi = min-max normalisation: positive affine maps of a plane do not change the loss.
    assert Fd.ssim_loss(3 * a + 1, b).item() == pytest.approx(Fd.ssim_loss(a, b).item(), abs=1e-5)
    # unrelated maps score well above correlated ones
    assert Fd.ssim_loss(a, b).item() > 0.3


def test_ssim_small_maps_shrink_the_window() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 8, 5, generator=gen, dtype=torch.float64)
    y = torch.rand(1, 1, 8, 5, generator=gen, dtype=torch.float64)
    ours = Fd.ssim_map(x, y)  # largest odd window <= min(8, 5, 11) is 5
    assert ours.shape == (1, 1, 4, 1)
    g = np.exp(-0.5 * (np.arange(5) - 2.0) ** 2 / 1.5**2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    xn, yn = x[0, 0].numpy(), y[0, 0].numpy()

    def blur(a: np.ndarray) -> np.ndarray:
        return correlate2d(a, w, mode="valid")

    mx, my = blur(xn), blur(yn)
    vx, vy, cxy = blur(xn * xn) - mx**2, blur(yn * yn) - my**2, blur(xn * yn) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    np.testing.assert_allclose(ours[0, 0].numpy(), ref, atol=1e-10)
    assert Fd.ssim_map(x[..., :6, :4], y[..., :6, :4]).shape == (1, 1, 4, 2)  # 4 -> window 3


def test_ssim_loss_one_by_one_map_degenerates_gracefully() -> None:
    s = torch.randn(2, 3, 1, 1, requires_grad=True)
    t = torch.randn(2, 3, 1, 1)
    loss = Fd.ssim_loss(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)  # every 1x1 plane normalises to 0
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert torch.isfinite(Fd.ssim_loss(torch.randn(1, 2, 1, 6), torch.randn(1, 2, 1, 6))).all()


def test_mse_and_msad_loss_values() -> None:
    gen = torch.Generator().manual_seed(4)
    s = {"p2": torch.randn(2, 3, 8, 8, generator=gen), "p3": torch.randn(2, 3, 4, 4, generator=gen)}
    t = {
        "p2": torch.randn(2, 3, 8, 8, generator=gen),
        "p3": torch.randn(2, 3, 4, 4, generator=gen),
        "p9": torch.zeros(1),
    }
    assert Fd.mse_loss(s["p2"], t["p2"]).item() == pytest.approx(((s["p2"] - t["p2"]) ** 2).mean().item())
    l1 = sum(np.abs(s[k].numpy() - t[k].numpy()).mean() for k in ("p2", "p3"))
    assert Fd.msad_loss(s, t).item() == pytest.approx(0.2 * 3.0 * l1, rel=1e-6)
    assert Fd.msad_loss(s, t, alpha=0.5, temperature=2.0, ramp=0.1).item() == pytest.approx(0.1 * l1, rel=1e-6)
    assert Fd.msad_loss(s, {k: v.clone() for k, v in s.items()}).item() == 0.0
    with pytest.raises(ValueError, match="p3"):
        Fd.msad_loss(s, {"p2": t["p2"]})


STUDENT = {f"p{lv}": 2**lv for lv in range(2, 7)}
TEACHER = {f"p{lv}": 2**lv for lv in range(3, 8)}


def _size(input_px: int, stride: int) -> int:
    return math.ceil(input_px / stride)


def test_pair_levels_half_resolution_pyramid_shift() -> None:
    pairs = Fd.pair_levels(STUDENT, TEACHER, student_scale=0.5, teacher_scale=1.0)
    assert pairs == [("p2", "p3"), ("p3", "p4"), ("p4", "p5"), ("p5", "p6"), ("p6", "p7")]
    for s_name, t_name in pairs:  # 64 px student vs 128 px teacher: identical map sizes
        assert _size(64, STUDENT[s_name]) == _size(128, TEACHER[t_name])
        assert STUDENT[s_name] / 0.5 == TEACHER[t_name] / 1.0  # same footprint in reference pixels
    assert Fd.is_pyramid_shift(0.5, 1.0)
    # absolute scales do not matter, only their ratio
    assert Fd.pair_levels(STUDENT, TEACHER, student_scale=1.0, teacher_scale=2.0) == pairs


def test_pair_levels_quarter_resolution_and_partial_overlap() -> None:
    pairs = Fd.pair_levels(STUDENT, TEACHER, student_scale=0.25, teacher_scale=1.0)
    assert pairs == [("p2", "p4"), ("p3", "p5"), ("p4", "p6"), ("p5", "p7")]  # p6 would need p8
    for s_name, t_name in pairs:
        assert _size(32, STUDENT[s_name]) == _size(128, TEACHER[t_name])


def test_pair_levels_same_resolution_and_fallback() -> None:
    same = Fd.pair_levels(TEACHER, TEACHER, student_scale=1.0, teacher_scale=1.0)
    assert same == [(n, n) for n in TEACHER]
    assert Fd.is_pyramid_shift(1.0, 1.0)
    assert not Fd.is_pyramid_shift(0.75, 1.0)
    # ratio 0.75 is no power of two: same-name pairs, the caller resizes
    fallback = Fd.pair_levels(STUDENT, TEACHER, student_scale=0.75, teacher_scale=1.0)
    assert fallback == [("p3", "p3"), ("p4", "p4"), ("p5", "p5"), ("p6", "p6")]


def test_pair_levels_without_overlap_raises() -> None:
    with pytest.raises(ValueError, match=r"p2.*p9|p9.*p2"):
        Fd.pair_levels({"p2": 4}, {"p9": 512}, student_scale=0.75, teacher_scale=1.0)
    with pytest.raises(ValueError, match="student levels"):
        Fd.pair_levels({"p2": 4}, {"p2": 4}, student_scale=0.5, teacher_scale=1.0)
    with pytest.raises(ValueError):
        Fd.pair_levels({"p2": 4}, {"p2": 4}, student_scale=0.0, teacher_scale=1.0)


def test_resize_to() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert Fd.resize_to(x, (4, 4)) is x
    y = Fd.resize_to(x, (8, 6))
    assert y.shape == (1, 1, 8, 6)
    ref = torch.nn.functional.interpolate(x, size=(8, 6), mode="bilinear", align_corners=False)
    assert torch.equal(y, ref)
    assert Fd.resize_to(torch.ones(2, 3, 5, 5), (3, 3)).allclose(torch.ones(2, 3, 3, 3))
