"""Functional building blocks of the distillation losses, for people with their own training loop.

Everything here is stateless: the loss modules in this package (``mse``, ``ssim``, ``mgd``,
``msad``, ``dsamkd``) are thin wrappers that add adapters / generators around these functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gaussian_window",
    "is_pyramid_shift",
    "minmax_normalize",
    "msad_loss",
    "mse_loss",
    "pair_levels",
    "resize_to",
    "ssim_loss",
    "ssim_map",
]


def _check_4d(name: str, x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be shaped (N, C, H, W), got {tuple(x.shape)}")


def minmax_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Map each (sample, channel) plane of ``x`` (N, C, H, W) to [0, 1] over H, W.

    SSIM's constants C1, C2 assume a known dynamic range; feature maps have none, so the
    structural loss compares min-max normalised maps. A constant plane maps to 0.
    """
    _check_4d("x", x)
    flat = x.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).view_as(x)


def _gaussian_1d(window_size: int, sigma: float, *, device=None, dtype=None) -> Tensor:
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    coords = torch.arange(window_size, device=device, dtype=torch.float64) - (window_size - 1) / 2
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    g = g / g.sum()
    return g.to(dtype=dtype or torch.get_default_dtype())


def gaussian_window(window_size: int, sigma: float, *, device=None, dtype=None) -> Tensor:
    """Normalised 2-D Gaussian window (window_size, window_size) that sums to 1."""
    g = _gaussian_1d(window_size, sigma, device=device, dtype=torch.float64)
    w = torch.outer(g, g)
    return (w / w.sum()).to(dtype=dtype or torch.get_default_dtype())


def effective_window(height: int, width: int, window_size: int) -> int:
    """Largest odd window <= min(height, width, window_size) (at least 1).

    Deep pyramid levels of small inputs (a 64 px student's P6 is 1x1) are smaller than the
    11x11 window; shrinking the window keeps SSIM defined there instead of failing.
    """
    w = max(1, min(height, width, window_size))
    return w if w % 2 == 1 else w - 1


def _blur_valid(x: Tensor, g: Tensor) -> Tensor:
    """Depthwise separable Gaussian filter with VALID padding (no border effects)."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim_map(
    x: Tensor,
    y: Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    c1: float = 0.01**2,
    c2: float = 0.03**2,
) -> Tensor:
    """Per-channel SSIM map of ``x`` and ``y`` (N, C, H, W) as in Wang et al. (2004).

    Local statistics use a depthwise Gaussian window with VALID padding, so the map is
    (N, C, H - w + 1, W - w + 1), the same region scikit-image keeps after its crop. When the
    map is smaller than the window, the largest odd window <= min(H, W, window_size) is used
    (same ``sigma``); a 1x1 map uses a 1x1 window, where SSIM reduces to the luminance term
    (variances are 0), i.e. 1 for equal inputs. Inputs are expected in [0, 1] (``c1``, ``c2``
    assume data range 1).
    """
    _check_4d("x", x)
    _check_4d("y", y)
    if x.shape != y.shape:
        raise ValueError(f"ssim_map needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, c, h, w = x.shape
    win = effective_window(h, w, window_size)
    g = _gaussian_1d(win, sigma, device=x.device, dtype=x.dtype)
    # One conv call for the five local moments.
    stats = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=0), g)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(n, dim=0)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = e_xx - mu_xx
    var_y = e_yy - mu_yy
    cov = e_xy - mu_xy
    num = (2 * mu_xy + c1) * (2 * cov + c2)
    den = (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    return num / den


def ssim_loss(student: Tensor, teacher: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural feature loss: mean over N and C of (1 - mean SSIM) / 2, a scalar in [0, 1].

    Both maps are min-max normalised per sample and channel first (psi in the paper), so the
    loss compares structure (local means, contrast, correlation), not feature scale. It is 0
    for identical inputs and symmetric in its arguments.
    """
    _check_4d("student", student)
    _check_4d("teacher", teacher)
    s = ssim_map(minmax_normalize(student), minmax_normalize(teacher), window_size=window_size, sigma=sigma)
    per_channel = s.flatten(2).mean(dim=2)  # (N, C)
    return ((1.0 - per_channel) / 2.0).mean()


def mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Plain mean squared error, the feature-distillation baseline."""
    return F.mse_loss(student, teacher)


def msad_loss(
    student: dict[str, Tensor],
    teacher: dict[str, Tensor],
    *,
    alpha: float = 0.2,
    temperature: float = 3.0,
    ramp: float = 1.0,
) -> Tensor:
    """MSAD feature loss: alpha * T * ramp * sum over levels (keys of ``student``) of mean |S_l - F_l|.

    ``teacher`` holds the (fused) teacher maps already paired and resized to the student's.
    """
    if not student:
        raise ValueError("msad_loss needs at least one level")
    missing = [k for k in student if k not in teacher]
    if missing:
        raise ValueError(f"teacher pyramid lacks levels {missing}; it has {sorted(teacher)}")
    total = sum((student[k] - teacher[k]).abs().mean() for k in student)
    return alpha * temperature * ramp * total


def _level_shift(student_scale: float, teacher_scale: float) -> int | None:
    """k = log2(teacher_scale / student_scale) when it is an integer (within 1e-6), else None."""
    if student_scale <= 0 or teacher_scale <= 0:
        raise ValueError(f"input scales must be > 0, got student {student_scale}, teacher {teacher_scale}")
    k = math.log2(teacher_scale / student_scale)
    r = round(k)
    return int(r) if abs(k - r) <= 1e-6 else None


def is_pyramid_shift(student_scale: float, teacher_scale: float) -> bool:
    """True when the input-scale ratio is a power of two (2**k, k = 0 included).

    Then student level l and teacher level l + k have the same footprint and the same spatial
    size, so levels pair by shifting the pyramid and no feature resizing is needed (k = 0 is
    the trivial shift: same resolution). Otherwise features must be resized.
    """
    return _level_shift(student_scale, teacher_scale) is not None


def pair_levels(
    student_strides: dict[str, int],
    teacher_strides: dict[str, int],
    *,
    student_scale: float,
    teacher_scale: float,
) -> list[tuple[str, str]]:
    """Pair student and teacher pyramid levels that see the same image footprint.

    A level with stride ``s`` in a model whose input is at scale ``scale`` (relative to a
    common reference view) covers ``s / scale`` reference pixels. When
    k = log2(teacher_scale / student_scale) is an integer, the student level with stride s is
    paired with the teacher level of stride s * 2**k (MSAD's pyramid shift: a half-resolution
    student's P2..P6 pair with the full-resolution teacher's P3..P7); student levels without a
    partner are dropped. For any other ratio, levels with the same name are paired and the
    caller resizes the teacher maps (see ``resize_to``). Pairs come in student level order
    (the order of ``student_strides``).
    """
    k = _level_shift(student_scale, teacher_scale)
    pairs: list[tuple[str, str]] = []
    if k is not None:
        by_stride = {float(s): name for name, s in teacher_strides.items()}
        for s_name, s_stride in student_strides.items():
            target = float(s_stride) * 2.0**k
            for t_stride, t_name in by_stride.items():
                if abs(t_stride - target) <= 1e-6 * target:
                    pairs.append((s_name, t_name))
                    break
    else:
        pairs = [(name, name) for name in student_strides if name in teacher_strides]
    if not pairs:
        how = f"pyramid shift k={k}" if k is not None else "same level names"
        raise ValueError(
            f"no student/teacher level pairs ({how}, student scale {student_scale}, teacher scale "
            f"{teacher_scale}): student levels {dict(student_strides)}, teacher levels {dict(teacher_strides)}"
        )
    return pairs


def resize_to(feature: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``feature`` (N, C, H, W) to ``size`` (align_corners=False); identity if already there."""
    _check_4d("feature", feature)
    size = (int(size[0]), int(size[1]))
    if tuple(feature.shape[-2:]) == size:
        return feature
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
