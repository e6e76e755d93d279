"""Padding-aware alignment of a teacher pyramid level onto a student level.

Each detector pads its batch to a multiple of its own coarsest stride, and the images of a
batch differ in size, so only the first ceil(h / stride) x ceil(w / stride) cells of a map
(clipped to the map) hold image content; the rest is padding. How much of a map an image
fills therefore differs between the student's and the teacher's map: comparing whole maps
cell by cell (or resizing one whole map to the other's size) compares misaligned cells.

``align_level`` puts the teacher's VALID cells on the student's grid, per sample: each valid
student cell takes the teacher's value at the same image position (bilinear, reading only
the teacher's valid cells); cells outside the student's valid region are left for
``valid_mask`` to exclude. The image position is exact: a student cell centre
(r + 0.5) * stride_s in the student's h_s pixels is the teacher cell-centre coordinate
(r + 0.5) * (stride_s * h_t) / (stride_t * h_s) - 0.5, from the two views' actual pixel
sizes h_s, h_t (after rounding). For a 2**k resolution ratio and sizes that divide evenly
this is the identity, and the teacher map is used as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LevelGrid", "align_level", "level_grids", "valid_mask"]


def _cells(pixels: int, stride: int, size: int) -> int:
    return min(-(-pixels // stride), size)  # ceil(pixels / stride), clipped to the map


@dataclass(frozen=True)
class LevelGrid:
    """Where the image content lies in one level's map of a padded batch.

    ``map_size`` is the map's (H, W), ``stride`` its stride in input pixels and
    ``image_sizes`` each sample's (h, w) in input pixels before padding.
    """

    level: str
    stride: int
    map_size: tuple[int, int]
    image_sizes: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        empty = [i for i, (r, c) in enumerate(self.valid) if r < 1 or c < 1]
        if self.stride < 1 or empty:
            raise ValueError(
                f"level {self.level!r} (stride {self.stride}, map {self.map_size}) has no valid cells for "
                f"samples {empty} of image sizes {list(self.image_sizes)}: it cannot be aligned"
            )

    @property
    def valid(self) -> tuple[tuple[int, int], ...]:
        """Each sample's valid (rows, cols): ceil(h / stride) x ceil(w / stride), clipped to the map."""
        height, width = self.map_size
        return tuple((_cells(h, self.stride, height), _cells(w, self.stride, width)) for h, w in self.image_sizes)

    @property
    def full(self) -> bool:
        """True when every cell of every sample is valid (no padding at this level)."""
        return all(v == self.map_size for v in self.valid)


def level_grids(
    pyramid: Mapping[str, Tensor], strides: Mapping[str, int], image_sizes: Sequence[tuple[int, int]]
) -> dict[str, LevelGrid]:
    """A ``LevelGrid`` per level of ``pyramid`` (level -> (N, C, H, W)), for a batch of these image sizes."""
    sizes = tuple((int(h), int(w)) for h, w in image_sizes)
    grids = {}
    for level, feature in pyramid.items():
        if feature.shape[0] != len(sizes):
            raise ValueError(f"level {level!r}: {feature.shape[0]} maps for {len(sizes)} image sizes")
        grids[level] = LevelGrid(level, int(strides[level]), (int(feature.shape[-2]), int(feature.shape[-1])), sizes)
    return grids


def valid_mask(grid: LevelGrid, device: torch.device | str | None = None) -> Tensor | None:
    """(N, 1, H, W) bool mask of the valid cells, or None when all cells are valid (no masking cost)."""
    if grid.full:
        return None
    height, width = grid.map_size
    rows, cols = torch.tensor(grid.valid, device=device).unbind(dim=1)
    in_rows = torch.arange(height, device=device)[None, :] < rows[:, None]  # (N, H)
    in_cols = torch.arange(width, device=device)[None, :] < cols[:, None]  # (N, W)
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def _same_geometry(teacher: LevelGrid, student: LevelGrid) -> bool:
    """True when student cell (r, c) and teacher cell (r, c) cover the same image region in every sample."""
    return all(
        student.stride * t_px == teacher.stride * s_px
        for (s_h, s_w), (t_h, t_w) in zip(student.image_sizes, teacher.image_sizes, strict=True)
        for s_px, t_px in ((s_h, t_h), (s_w, t_w))
    )


def _fit(feature: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop or zero-pad ``feature`` at the bottom/right to ``size`` (only padding cells change)."""
    height, width = size
    if tuple(feature.shape[-2:]) == (height, width):
        return feature
    out = feature[..., :height, :width]
    pad_h, pad_w = height - out.shape[-2], width - out.shape[-1]
    return F.pad(out, (0, pad_w, 0, pad_h)) if pad_h or pad_w else out


def _centres(count: int, ratio: Tensor, last: Tensor) -> Tensor:
    """Teacher cell-centre coordinates (N, count) of ``count`` student cell centres, clamped to [0, last]."""
    index = torch.arange(count, device=ratio.device, dtype=ratio.dtype) + 0.5
    return torch.minimum((index[None, :] * ratio[:, None] - 0.5).clamp_min(0.0), last[:, None])


def align_level(teacher_map: Tensor, *, teacher: LevelGrid, student: LevelGrid) -> Tensor:
    """The teacher map (N, C, Ht, Wt) on the student's grid (N, C, Hs, Ws), sample by sample.

    Only the teacher's valid cells are read. Fast paths: the map itself when the geometry is
    identical (2**k ratio, evenly dividing sizes), a crop/zero-pad when only the padding differs.
    Cells outside the student's valid region hold no meaningful value: mask them (``valid_mask``).
    """
    n = teacher_map.shape[0]
    if len(student.image_sizes) != n or len(teacher.image_sizes) != n:
        raise ValueError(
            f"student level {student.level!r} has {len(student.image_sizes)} samples, teacher level "
            f"{teacher.level!r} {len(teacher.image_sizes)} and its map {tuple(teacher_map.shape)}: cannot align"
        )
    if tuple(teacher_map.shape[-2:]) != teacher.map_size:
        raise ValueError(f"teacher level {teacher.level!r}: map {tuple(teacher_map.shape)} but grid {teacher.map_size}")
    if _same_geometry(teacher, student):
        return _fit(teacher_map, student.map_size)
    pairs = list(zip(student.image_sizes, teacher.image_sizes, strict=True))
    step = student.stride / teacher.stride  # teacher cells per student cell, times t_px / s_px below

    def column(values: list[float]) -> Tensor:
        return torch.tensor(values, device=teacher_map.device, dtype=teacher_map.dtype)

    ys = _centres(
        student.map_size[0], column([step * t[0] / s[0] for s, t in pairs]), column([r - 1 for r, _ in teacher.valid])
    )
    xs = _centres(
        student.map_size[1], column([step * t[1] / s[1] for s, t in pairs]), column([c - 1 for _, c in teacher.valid])
    )
    height, width = teacher.map_size
    gy = (2 * ys + 1) / height - 1  # grid_sample's normalised coordinates (align_corners=False)
    gx = (2 * xs + 1) / width - 1
    grid = torch.stack(
        [gx[:, None, :].expand(n, ys.shape[1], xs.shape[1]), gy[:, :, None].expand(n, ys.shape[1], xs.shape[1])],
        dim=-1,
    )
    return F.grid_sample(teacher_map, grid, mode="bilinear", padding_mode="border", align_corners=False)
