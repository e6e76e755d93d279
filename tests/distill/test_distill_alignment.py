"""Padding-aware level pairing: valid cells, exact image positions, masks through the real Distiller."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from factories import random_batch
from torch import nn

from detkd.distill import functional as Fd
from detkd.distill.align import LevelGrid, align_level, level_grids, valid_mask
from detkd.distill.distiller import Distiller, Teacher
from detkd.models import build_detector
from detkd.models.detectors import pyramid_strides

PADDED = 1e3  # what a position-encoding teacher holds on its padded cells


def _student():
    torch.manual_seed(1)
    return build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=2, max_level=6, fpn_channels=32)


def _teacher():
    torch.manual_seed(2)
    return build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=3, max_level=7, fpn_channels=64)


def _batch(sizes: list[tuple[int, int]]):
    return random_batch([([[4.0, 6.0, 40.0, 50.0]], [1]) for _ in sizes], sizes=sizes, seed=0, generator=True)


def _rectangle(shape: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.bool)
    out[:rows, :cols] = True
    return out


def test_level_grid_counts_valid_cells_per_sample() -> None:
    # a 127x97 and a 90x131 image padded to 128x256 (teacher, coarsest stride 128): stride-8 map 16x32
    grid = LevelGrid("p3", 8, (16, 32), ((127, 97), (90, 131)))
    assert grid.valid == ((16, 13), (12, 17))  # ceil(h / 8) x ceil(w / 8)
    assert not grid.full
    mask = valid_mask(grid)
    assert mask is not None and mask.shape == (2, 1, 16, 32) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], _rectangle((16, 32), 16, 13))
    assert torch.equal(mask[1, 0], _rectangle((16, 32), 12, 17))
    # deep levels clip to the map: a 1x2 map of stride 64 for the same images
    assert LevelGrid("p6", 64, (1, 2), ((127, 97), (90, 131))).valid == ((1, 2), (1, 2))
    full = LevelGrid("p3", 8, (16, 16), ((128, 128), (121, 128)))
    assert full.full and valid_mask(full) is None  # no padding: no mask, no masking cost


def test_same_geometry_passes_the_teacher_map_through_untouched() -> None:
    t = torch.randn(2, 4, 16, 16)
    student = LevelGrid("p2", 4, (16, 16), ((64, 64), (64, 60)))
    teacher = LevelGrid("p3", 8, (16, 16), ((128, 128), (128, 120)))
    assert align_level(t, teacher=teacher, student=student) is t
    # only the padding differs (the teacher pads to 256): a crop, no resampling
    wide = torch.randn(2, 4, 16, 32)
    cropped = align_level(wide, teacher=LevelGrid("p3", 8, (16, 32), teacher.image_sizes), student=student)
    assert torch.equal(cropped, wide[..., :16])


def test_align_reads_only_valid_teacher_cells_at_the_same_image_position() -> None:
    # student 48x36 px (stride 4: 12x9 valid in a 16x16 map), teacher 97x73 px (stride 8: 13x10 valid in 16x16)
    student = LevelGrid("p2", 4, (16, 16), ((48, 36),))
    teacher = LevelGrid("p3", 8, (16, 16), ((97, 73),))
    ys = (torch.arange(16.0) + 0.5) * 8  # teacher cell centres in teacher pixels
    t = torch.stack([ys[:, None].expand(16, 16), ys[None, :].expand(16, 16)]).unsqueeze(0).clone()
    t[..., 13:, :] = PADDED
    t[..., :, 10:] = PADDED
    out = align_level(t, teacher=teacher, student=student)
    true_y = ((torch.arange(12.0) + 0.5) * 4 * 97 / 48).clamp(4.0, 12.5 * 8)  # clamped to the valid centres
    true_x = ((torch.arange(9.0) + 0.5) * 4 * 73 / 36).clamp(4.0, 9.5 * 8)
    torch.testing.assert_close(out[0, 0, :12, :9], true_y[:, None].expand(12, 9), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[0, 1, :12, :9], true_x[None, :].expand(12, 9), atol=1e-3, rtol=0)


def test_unalignable_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"'p4'.*\(0, 97\).*cannot be aligned"):
        LevelGrid("p4", 16, (8, 8), ((0, 97),))
    with pytest.raises(ValueError, match=r"'p3'.*2 maps for 3 image sizes"):
        level_grids({"p3": torch.zeros(2, 1, 4, 4)}, {"p3": 8}, [(32, 32)] * 3)
    student = LevelGrid("p2", 4, (8, 8), ((32, 32),))
    teacher = LevelGrid("p3", 8, (8, 8), ((64, 64),))
    with pytest.raises(ValueError, match=r"'p2'.*'p3'.*cannot align"):
        align_level(torch.zeros(2, 1, 8, 8), teacher=teacher, student=student)
    # no teacher level within half an octave of any student level: nothing to pair
    with pytest.raises(ValueError, match=r"no student/teacher level pairs.*'p2'.*'p7'"):
        Fd.pair_levels({"p2": 4, "p3": 8}, {"p7": 128}, student_scale=0.75, teacher_scale=1.0)
    with pytest.raises(ValueError, match="no student/teacher level pairs"):
        Distiller(student=_student(), student_scale=1 / 64, teachers=[Teacher(_teacher(), 1.0)], methods={"mse": {}})


def test_pairing_takes_the_nearest_footprint_for_other_ratios() -> None:
    student = {f"p{lv}": 2**lv for lv in range(2, 7)}
    teacher = {f"p{lv}": 2**lv for lv in range(3, 8)}
    # 0.75: same names (footprints 4/3 apart); the student's P2 has no teacher level within half an octave
    assert Fd.pair_levels(student, teacher, student_scale=0.75, teacher_scale=1.0) == [
        (f"p{lv}", f"p{lv}") for lv in range(3, 7)
    ]
    # 0.7: P3 covers 11.4 px, nearer the teacher's P4 (16 px) than its P3 (8 px)
    assert Fd.pair_levels(student, teacher, student_scale=0.7, teacher_scale=1.0) == [
        (f"p{lv}", f"p{lv + 1}") for lv in range(2, 7)
    ]
    # a teacher at 1.5x the student's resolution: student P3 (8 px) pairs with teacher P4 (10.7 px)
    assert Fd.pair_levels(teacher, teacher, student_scale=1.0, teacher_scale=1.5)[0] == ("p3", "p4")


class _Recorder:
    """Records what the Distiller hands a loss (pyramids, masks, logits) through a forward pre-hook."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list[tuple[dict, dict, dict]] = []
        module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        self.calls.append(({k: v.detach() for k, v in args[0].items()}, dict(args[1]), dict(kwargs)))


def _position_teacher(teacher: nn.Module, sizes: list[tuple[int, int]]) -> None:
    """Make the teacher's pyramid encode image position: channel 0 = y, 1 = x (teacher pixels of the
    cell centre), 2 = 1000 * sample index, 3 = 0 on valid cells and PADDED on padded ones."""
    strides = pyramid_strides(teacher)

    def hook(module, inputs, output):
        out = OrderedDict()
        for level, feat in output.items():
            n, c, h, w = feat.shape
            s = strides[level]
            enc = torch.zeros(n, c, h, w)
            enc[:, 0] = ((torch.arange(h) + 0.5) * s)[:, None]
            enc[:, 1] = ((torch.arange(w) + 0.5) * s)[None, :]
            for i, (ih, iw) in enumerate(sizes):
                enc[i, 2] = 1000.0 * i
                enc[i, 3] = PADDED
                enc[i, 3, : math.ceil(ih / s), : math.ceil(iw / s)] = 0.0
            out[level] = enc
        return out

    teacher.backbone.register_forward_hook(hook)


def _check_alignment(scale: float, sizes: list[tuple[int, int]]) -> None:
    teacher = _teacher()
    _position_teacher(teacher, sizes)
    student = _student()
    seen: dict[str, list[tuple[int, int]]] = {}
    student.register_forward_pre_hook(lambda m, args: seen.update(sizes=[tuple(i.shape[-2:]) for i in args[0]]))
    distiller = Distiller(student=student, student_scale=scale, teachers=[Teacher(teacher, 1.0)], methods={"mse": {}})
    recorder = _Recorder(distiller.losses["mse"])
    distiller.train()
    distiller(*_batch(sizes))
    s_strides, t_strides = pyramid_strides(student), pyramid_strides(teacher)
    _, aligned, kwargs = recorder.calls[0]
    masks = kwargs["masks"]
    assert masks is not None
    for s_lv, t_lv in distiller.pairs["mse"]:
        ss, ts = s_strides[s_lv], t_strides[t_lv]
        for i, ((hs, ws), (ht, wt)) in enumerate(zip(seen["sizes"], sizes, strict=True)):
            rows, cols = math.ceil(hs / ss), math.ceil(ws / ss)
            mask = masks[s_lv][i, 0] if s_lv in masks else torch.ones_like(aligned[s_lv][i, 0], dtype=torch.bool)
            assert torch.equal(mask, _rectangle(tuple(mask.shape), rows, cols)), (s_lv, i)
            region = aligned[s_lv][i, :4, :rows, :cols]
            # the image position of each student cell centre, in teacher pixels, within the teacher's valid centres
            y = ((torch.arange(rows) + 0.5) * ss * ht / hs).clamp(ts / 2, (math.ceil(ht / ts) - 0.5) * ts)
            x = ((torch.arange(cols) + 0.5) * ss * wt / ws).clamp(ts / 2, (math.ceil(wt / ts) - 0.5) * ts)
            torch.testing.assert_close(region[0], y[:, None].expand(rows, cols), atol=1e-3, rtol=0)
            torch.testing.assert_close(region[1], x[None, :].expand(rows, cols), atol=1e-3, rtol=0)
            torch.testing.assert_close(region[2], torch.full((rows, cols), 1000.0 * i))  # its own sample
            assert region[3].abs().max() < 1e-2  # never the teacher's padded cells


def test_odd_sizes_at_half_resolution_compare_the_same_image_region() -> None:
    """127x97 and 90x131 in one batch: the ceil rounding of the two views differs by a cell."""
    _check_alignment(0.5, [(127, 97), (90, 131)])


def test_three_quarter_resolution_with_landscape_and_portrait_images() -> None:
    _check_alignment(0.75, [(124, 93), (93, 124)])


def test_padded_student_cells_change_neither_kd_loss_nor_gradient() -> None:
    """Noise on the student's padded cells (after its FPN) leaves every kd term and its gradient alone."""
    sizes = [(127, 97), (90, 131)]
    methods = {
        "mse": {},
        "ssim": {},
        "mgd": {"weight": 1e-3},
        "msad": {"ramp_iters": 0},
        "dsamkd": {"logit_weight": 0.0, "feature_weight": 1e-3},
    }
    student = _student()
    distiller = Distiller(student=student, student_scale=0.5, teachers=[Teacher(_teacher(), 1.0)], methods=methods)
    distiller.train()
    strides = pyramid_strides(student)
    noise = {"on": False}

    def perturb(module, inputs, output):
        if not noise["on"]:
            return output
        out = OrderedDict()
        for level, feat in output.items():
            pad = torch.ones_like(feat[:, :1], dtype=torch.bool)
            for i, (h, w) in enumerate([(64, 48), (45, 66)]):  # the student's view of ``sizes``
                pad[i, :, : math.ceil(h / strides[level]), : math.ceil(w / strides[level])] = False
            noise_gen = torch.Generator().manual_seed(7)  # not the global RNG, which draws MGD's masks
            out[level] = feat + 50.0 * torch.randn(feat.shape, generator=noise_gen) * pad
        return out

    student.backbone.register_forward_hook(perturb)

    def kd_and_grads() -> tuple[dict[str, float], list[torch.Tensor]]:
        distiller.zero_grad()
        torch.manual_seed(0)
        losses = distiller(*_batch(sizes))
        kd = {k: v for k, v in losses.items() if k.startswith("kd_")}
        sum(kd.values()).backward()
        grads = [p.grad.clone() for p in distiller.parameters() if p.grad is not None]
        return {k: v.item() for k, v in kd.items()}, grads

    clean, clean_grads = kd_and_grads()
    noise["on"] = True
    noisy, noisy_grads = kd_and_grads()
    assert set(clean) == {"kd_mse", "kd_ssim", "kd_mgd", "kd_msad", "kd_dsamkd_feature"}
    assert clean == pytest.approx(noisy, rel=1e-5, abs=1e-8)
    assert len(clean_grads) == len(noisy_grads) > 0
    for a, b in zip(clean_grads, noisy_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_fast_path_no_masks_and_teacher_maps_untouched() -> None:
    """Equal square images at a 2**k ratio: no mask, and the loss sees the teacher's own tensors."""
    teacher = _teacher()
    produced: dict[str, torch.Tensor] = {}
    teacher.backbone.register_forward_hook(lambda m, i, out: produced.update(out))
    distiller = Distiller(student=_student(), student_scale=0.5, teachers=[Teacher(teacher, 1.0)], methods={"mse": {}})
    recorder = _Recorder(distiller.losses["mse"])
    distiller.train()
    distiller(*_batch([(128, 128), (128, 128)]))
    _, aligned, kwargs = recorder.calls[0]
    assert kwargs["masks"] is None
    assert kwargs["student_logits"] is None and kwargs["teacher_logits"] is None  # mse needs no logits
    for s_lv, t_lv in distiller.pairs["mse"]:
        assert aligned[s_lv] is produced[t_lv]
