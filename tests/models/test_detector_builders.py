"""Builders: pyramid levels, strides and shapes; taps do not change outputs."""

from __future__ import annotations

import pytest
import torch
from factories import random_batch

from detkd.models import DetectorTaps, build_detector, pyramid_strides
from detkd.models.detectors import default_anchor_sizes


def _batch(size: int = 128):
    return random_batch([([[10.0, 12.0, 50.0, 60.0]], [1]), ([[30.0, 30.0, 40.0, 44.0]], [2])], size=size)


@pytest.mark.parametrize("arch", ["fcos", "retinanet", "fasterrcnn"])
@pytest.mark.parametrize("levels", [(3, 7), (2, 6)])
def test_pyramid_levels_strides_and_shapes(arch, levels):
    lo, hi = levels
    model = build_detector(arch=arch, backbone="tiny", num_classes=3, min_level=lo, max_level=hi, fpn_channels=32)
    strides = pyramid_strides(model)
    assert list(strides) == [f"p{lvl}" for lvl in range(lo, hi + 1)]
    assert list(strides.values()) == [2**lvl for lvl in range(lo, hi + 1)]
    images, targets = _batch(128)
    model.train()
    with DetectorTaps(model) as taps:
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    for name, feat in taps.pyramid.items():
        stride = strides[name]
        assert feat.shape == (2, 32, 128 // stride, 128 // stride), name


def test_half_resolution_shifted_pyramid_matches_teacher_sizes():
    teacher = build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=3, max_level=7)
    student = build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=2, max_level=6)
    teacher.eval()
    student.eval()
    with torch.no_grad(), DetectorTaps(teacher) as t_taps, DetectorTaps(student) as s_taps:
        teacher([torch.rand(3, 128, 128)])
        student([torch.rand(3, 64, 64)])
    t_shapes = [f.shape[-2:] for f in t_taps.pyramid.values()]
    s_shapes = [f.shape[-2:] for f in s_taps.pyramid.values()]
    assert t_shapes == s_shapes  # P(l) at 64 px == P(l+1) at 128 px


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "mobilenet_v3_large"])
def test_real_backbones_build_and_give_all_levels(backbone):
    model = build_detector(arch="retinanet", backbone=backbone, num_classes=2, min_level=2, max_level=6)
    model.eval()
    with torch.no_grad(), DetectorTaps(model) as taps:
        model([torch.rand(3, 96, 96)])
    # 96 px is padded to 128 (multiple of the coarsest stride 64)
    assert {k: v.shape[-1] for k, v in taps.pyramid.items()} == {"p2": 32, "p3": 16, "p4": 8, "p5": 4, "p6": 2}


@pytest.mark.parametrize("arch", ["fcos", "retinanet"])
def test_taps_leave_outputs_unchanged_and_expose_dense_logits(arch):
    model = build_detector(arch=arch, backbone="tiny", num_classes=3, score_thresh=0.0)
    model.eval()
    images, _ = _batch(128)
    with torch.no_grad():
        plain = model(images)
        with DetectorTaps(model) as taps:
            tapped = model(images)
    for a, b in zip(plain, tapped, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    anchors = 1 if arch == "fcos" else 9
    logits = taps.class_logits
    assert list(logits) == list(taps.pyramid)
    for name, level_logits in logits.items():
        h, w = taps.pyramid[name].shape[-2:]
        assert level_logits.shape == (2, anchors * 4, h, w)
    # the per-level view is a pure reshape of torchvision's (N, HWA, K) tensor
    assert sum(v.numel() for v in logits.values()) == taps._dense_logits.numel()
    first = logits["p3"]
    dense = taps._dense_logits
    # position (y=1, x=2), anchor 0, class 1 of level p3 is row (1*W + 2)*A + 0 in the dense tensor
    w = taps.pyramid["p3"].shape[-1]
    assert torch.equal(first[:, 1, 1, 2], dense[:, (1 * w + 2) * anchors, 1])


def test_taps_removed_after_context():
    model = build_detector(arch="fcos", backbone="tiny", num_classes=1)
    with DetectorTaps(model):
        pass
    assert not model.backbone._forward_hooks
    assert not model.head.classification_head._forward_hooks


def test_two_stage_detector_has_no_dense_logits():
    model = build_detector(arch="fasterrcnn", backbone="tiny", num_classes=2)
    model.eval()
    with torch.no_grad(), DetectorTaps(model) as taps:
        model([torch.rand(3, 64, 64)])
    assert not taps.has_logits
    with pytest.raises(RuntimeError):
        _ = taps.class_logits


def test_anchor_sizes_follow_strides_and_are_configurable():
    assert default_anchor_sizes("fcos", 2, 4) == [[4.0], [8.0], [16.0]]
    model = build_detector(
        arch="fcos", backbone="tiny", num_classes=1, min_level=3, max_level=4, anchor_sizes=[[6.0], [12.0]]
    )
    assert model.anchor_generator.sizes == ((6.0,), (12.0,))
    with pytest.raises(ValueError, match="anchor_sizes has 1 levels"):
        build_detector(arch="fcos", backbone="tiny", num_classes=1, min_level=3, max_level=4, anchor_sizes=[[6.0]])


def test_bad_builder_arguments_are_named():
    with pytest.raises(ValueError, match="arch: Input should be"):
        build_detector(arch="yolo", backbone="tiny", num_classes=1)
    with pytest.raises(ValueError, match="backbone: Input should be"):
        build_detector(arch="fcos", backbone="vgg", num_classes=1)
    with pytest.raises(ValueError, match="min_level"):
        build_detector(arch="fcos", backbone="tiny", num_classes=1, min_level=1)
