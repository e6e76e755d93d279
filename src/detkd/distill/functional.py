"""Functional building blocks of the distillation losses, for people with their own training loop.

Everything here is stateless: the loss modules in this package (``mse``, ``ssim``, ``mgd``,
``msad``, ``dsamkd``) are thin wrappers that add adapters / generators around these functions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "at_least_float32",
    "effective_window",
    "full_precision",
    "gaussian_window",
    "is_pyramid_shift",
    "masked_mean",
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


def _valid(mask: Tensor, x: Tensor) -> Tensor:
    """``mask`` as a bool (N, 1, H, W) tensor of ``x``'s valid cells (nonzero = valid)."""
    if mask.dim() != 4 or tuple(mask.shape) != (x.shape[0], 1, *x.shape[-2:]):
        raise ValueError(f"mask {tuple(mask.shape)} must be (N, 1, H, W) for a map {tuple(x.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``x`` (N, C, H, W) over the valid cells of ``mask`` (N, 1, H, W), all channels.

    ``x`` is zeroed outside the mask before summing, so padded cells get exactly zero gradient.
    No valid cell at all gives 0. ``mask=None`` is the plain mean.
    """
    if mask is None:
        return x.mean()
    keep = _valid(mask, x).to(x.dtype)
    return (x * keep).sum() / (keep.sum() * x.shape[1]).clamp_min(1)


def minmax_normalize(x: Tensor, eps: float = 1e-6, *, mask: Tensor | None = None) -> Tensor:
    """Map each (sample, channel) plane of ``x`` (N, C, H, W) to [0, 1] over H, W.

    SSIM's constants C1, C2 assume a known dynamic range; feature maps have none, so the
    structural loss compares min-max normalised maps. A constant plane maps to 0. With
    ``mask`` (N, 1, H, W), min and max are taken over the valid cells only and invalid cells
    map to 0 (with zero gradient).
    """
    _check_4d("x", x)
    if mask is None:
        flat = x.flatten(2)
        lo = flat.amin(dim=2, keepdim=True)  # (torch.aminmax measured slower here, forward and backward)
        hi = flat.amax(dim=2, keepdim=True)
        return ((flat - lo) / (hi - lo + eps)).view_as(x)
    invalid = ~_valid(mask, x)
    lo = x.masked_fill(invalid, math.inf).flatten(2).amin(dim=2, keepdim=True)
    hi = x.masked_fill(invalid, -math.inf).flatten(2).amax(dim=2, keepdim=True)
    out = (x.flatten(2) - lo) / (hi - lo + eps)
    return out.view_as(x).masked_fill(invalid, 0.0)


@functools.lru_cache(maxsize=64)
def _window_1d(window_size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The normalised 1-D Gaussian, built once per (size, sigma, device, dtype): SSIM runs every step."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if first built in inference mode
        coords = torch.arange(window_size, dtype=torch.float64, device="cpu") - (window_size - 1) / 2
        g = torch.exp(-0.5 * (coords / sigma) ** 2)
        return (g / g.sum()).to(device=device, dtype=dtype)


def _gaussian_1d(window_size: int, sigma: float, *, device=None, dtype=None) -> Tensor:
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return _window_1d(int(window_size), float(sigma), torch.device(device or "cpu"), dtype or torch.get_default_dtype())


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
    k = g.numel()
    if k == 1:  # the 1x1 window is the identity (its only weight is exactly 1)
        return x
    c = x.shape[1]
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
    # Two conv calls: the moments of x (x, x*x, x*y) and those of y alone (y, y*y). When y is the
    # detached teacher, autograd then never back-propagates through the blur of y's two moments.
    mu_x, e_xx, e_xy = _blur_valid(torch.cat([x, x * x, x * y], dim=0), g).split(n, dim=0)
    mu_y, e_yy = _blur_valid(torch.cat([y, y * y], dim=0), g).split(n, dim=0)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = e_xx - mu_xx
    var_y = e_yy - mu_yy
    cov = e_xy - mu_xy
    num = (2 * mu_xy + c1) * (2 * cov + c2)
    den = (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    return num / den


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in at least float32 (half and bfloat16 are upcast, float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def full_precision(x: Tensor) -> torch.autocast:
    """A context with autocast off on ``x``'s device: under bf16 autocast the SSIM moments'
    variance error (E[x^2] - E[x]^2 in bf16) is as large as C2, so SSIM runs in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def ssim_loss(
    student: Tensor,
    teacher: Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """Structural feature loss: mean over N and C of (1 - mean SSIM) / 2, a scalar in [0, 1].

    Both maps are min-max normalised per sample and channel first (psi in the paper), so the
    loss compares structure (local means, contrast, correlation), not feature scale. It is 0
    for identical inputs and symmetric in its arguments. It is computed in float32 (or
    float64) with autocast off, whatever the inputs' dtype.

    ``mask`` (N, 1, H, W) marks each sample's valid cells, a rectangle (as the Distiller makes
    them for padded batches); padded cells then never count:
      * min and max of the normalisation are taken over the valid cells;
      * each sample uses the largest odd window <= min(its valid rows, its valid columns,
        ``window_size``), like an unpadded map of the valid region's size would;
      * the SSIM map is 'valid'-convolved, so its cell (i, j) summarises the input window
        [i, i + w) x [j, j + w); it counts only when that whole window lies on valid cells,
        i.e. the map's valid region of a sample with r x c valid cells is
        (r - w + 1) x (c - w + 1) (the valid mask eroded by the window);
      * the per-channel mean SSIM is the mean over those map cells.
    Reading the per-sample windows off the mask costs one device-to-host copy per call.
    """
    _check_4d("student", student)
    _check_4d("teacher", teacher)
    with full_precision(student):
        s, t = at_least_float32(student), at_least_float32(teacher)
        if mask is None:
            smap = ssim_map(minmax_normalize(s), minmax_normalize(t), window_size=window_size, sigma=sigma)
            per_channel = smap.flatten(2).mean(dim=2)  # (N, C)
            return ((1.0 - per_channel) / 2.0).mean()
        return _masked_ssim_loss(s, t, _valid(mask, s), window_size, sigma)


def _ssim_windows(valid: Tensor, window_size: int) -> list[int]:
    """Each sample's SSIM window from its rectangle of valid cells (raises if empty or not a rectangle)."""
    rows = valid.any(dim=3).sum(dim=(1, 2))
    cols = valid.any(dim=2).sum(dim=(1, 2))
    cells = valid.sum(dim=(1, 2, 3))
    windows = []
    for i, (r, c, k) in enumerate(torch.stack([rows, cols, cells], dim=1).tolist()):
        if k == 0 or k != r * c:
            raise ValueError(
                f"mask of sample {i} must mark a non-empty rectangle of valid cells, "
                f"got {k} cells in {r} rows x {c} cols"
            )
        windows.append(effective_window(r, c, window_size))
    return windows


def _masked_ssim_loss(s: Tensor, t: Tensor, valid: Tensor, window_size: int, sigma: float) -> Tensor:
    """``ssim_loss`` restricted to the valid cells (see there); samples are grouped by window size."""
    n, c = s.shape[:2]
    xs, ys = minmax_normalize(s, mask=valid), minmax_normalize(t, mask=valid)
    windows = _ssim_windows(valid, window_size)
    total = s.new_zeros(())
    for win in sorted(set(windows)):
        idx = [i for i, w in enumerate(windows) if w == win]
        pick: slice | list[int] = slice(None) if len(idx) == n else idx
        smap = ssim_map(xs[pick], ys[pick], window_size=win, sigma=sigma)
        inside = valid[pick].to(smap.dtype)
        if win > 1:  # erosion: a map cell counts when its whole window is valid
            inside = 1.0 - F.max_pool2d(1.0 - inside, win, stride=1)
        per_channel = (smap * inside).sum(dim=(2, 3)) / inside.sum(dim=(2, 3))  # (n_group, C)
        total = total + ((1.0 - per_channel) / 2.0).sum()
    return total / (n * c)


def mse_loss(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Plain mean squared error, the feature-distillation baseline; with ``mask``, over valid cells only."""
    if mask is None:
        return F.mse_loss(student, teacher)
    return masked_mean((student - teacher) ** 2, mask)


def cosine_distance(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Mean over cells (valid ones with ``mask``) of 1 - cos(student, teacher), the cosine over channels."""
    distance = 1.0 - F.cosine_similarity(student, teacher, dim=1, eps=1e-6).unsqueeze(1)  # (N, 1, H, W)
    return masked_mean(distance, mask)


def msad_loss(
    student: dict[str, Tensor],
    teacher: dict[str, Tensor],
    *,
    alpha: float = 0.2,
    temperature: float = 3.0,
    ramp: float = 1.0,
    masks: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """MSAD feature loss: alpha * T * ramp * sum over levels (keys of ``student``) of mean |S_l - F_l|.

    ``teacher`` holds the (fused) teacher maps already paired and aligned to the student's.
    ``masks`` (level -> (N, 1, H, W)) restricts each level's mean to its valid cells; a level
    without a mask is valid everywhere.
    """
    if not student:
        raise ValueError("msad_loss needs at least one level")
    missing = [k for k in student if k not in teacher]
    if missing:
        raise ValueError(f"teacher pyramid lacks levels {missing}; it has {sorted(teacher)}")
    masks = masks or {}
    total = sum(masked_mean((student[k] - teacher[k]).abs(), masks.get(k)) for k in student)
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

    Then student level l and teacher level l + k have the same footprint and, for inputs whose
    sizes divide evenly, the same spatial size, so levels pair by shifting the pyramid (k = 0
    is the trivial shift: same resolution). Otherwise features must be resampled.
    """
    return _level_shift(student_scale, teacher_scale) is not None


def _partner(
    footprint: float, teacher_strides: Mapping[str, int], teacher_scale: float, tolerance: float
) -> str | None:
    """The teacher level whose footprint is nearest ``footprint`` in log2 (ties: the finer one), within tolerance."""
    best: tuple[float, float, str] | None = None
    for name, stride in teacher_strides.items():
        distance = abs(math.log2(stride / teacher_scale) - math.log2(footprint))
        if best is None or (distance, stride) < best[:2]:
            best = (distance, float(stride), name)
    return best[2] if best is not None and best[0] <= tolerance else None


def pair_levels(
    student_strides: Mapping[str, int],
    teacher_strides: Mapping[str, int],
    *,
    student_scale: float,
    teacher_scale: float,
) -> list[tuple[str, str]]:
    """Pair student and teacher pyramid levels that see the same image footprint.

    A level with stride ``s`` in a model whose input is at scale ``scale`` (relative to a
    common reference view) covers ``s / scale`` reference pixels (its footprint). Each student
    level pairs with the teacher level whose footprint is nearest in log2:
      * when k = log2(teacher_scale / student_scale) is an integer only an exact match counts,
        i.e. stride s pairs with teacher stride s * 2**k (MSAD's pyramid shift: a
        half-resolution student's P2..P6 pair with the full-resolution teacher's P3..P7);
      * for any other ratio the nearest footprint within half an octave counts (ties go to the
        finer teacher level); for 0.75 that is the level of the same name. The caller resamples
        the teacher maps onto the student's grid (``detkd.distill.align``).
    Student levels without a partner are dropped; none at all is a ValueError. Pairs come in
    student level order (the order of ``student_strides``).
    """
    k = _level_shift(student_scale, teacher_scale)
    tolerance = 1e-6 if k is not None else 0.5 + 1e-9
    pairs: list[tuple[str, str]] = []
    for s_name, s_stride in student_strides.items():
        t_name = _partner(s_stride / student_scale, teacher_strides, teacher_scale, tolerance)
        if t_name is not None:
            pairs.append((s_name, t_name))
    if not pairs:
        how = f"pyramid shift k={k}" if k is not None else "nearest footprint within half an octave"
        raise ValueError(
            f"no student/teacher level pairs ({how}, student scale {student_scale}, teacher scale "
            f"{teacher_scale}): student levels {dict(student_strides)}, teacher levels {dict(teacher_strides)}"
        )
    return pairs


def pair_nearest(
    student_strides: Mapping[str, int],
    teacher_strides: Mapping[str, int],
    *,
    student_scale: float,
    teacher_scale: float,
) -> list[tuple[str, str]]:
    """Pair each teacher level with the ONE student level whose footprint is nearest in log2 (ties: the finer).

    For teachers whose levels are not a pyramid of power-of-2 strides, such as a vision
    transformer's single patch map of stride 14 or 16: every teacher level gets a partner,
    whatever the distance, and the caller resamples the map onto the partner's grid
    (``detkd.distill.align``). Pairs come as (student level, teacher level).
    """
    if not student_strides or not teacher_strides:
        raise ValueError(f"no levels to pair: student {dict(student_strides)}, teacher {dict(teacher_strides)}")
    pairs = []
    for t_name, t_stride in teacher_strides.items():
        footprint = math.log2(t_stride / teacher_scale)
        s_name = min(
            student_strides,
            key=lambda s: (abs(math.log2(student_strides[s] / student_scale) - footprint), student_strides[s]),
        )
        pairs.append((s_name, t_name))
    return pairs


def resize_to(feature: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``feature`` (N, C, H, W) to ``size`` (align_corners=False); identity if already there."""
    _check_4d("feature", feature)
    size = (int(size[0]), int(size[1]))
    if tuple(feature.shape[-2:]) == size:
        return feature
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
