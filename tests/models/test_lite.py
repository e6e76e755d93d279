"""The lite FCOS student design: structure, training, taps, checkpoints and refusals (no Ray)."""

from __future__ import annotations

import pytest
import torch
from factories import random_batch
from pydantic import ValidationError
from torch import nn

from detkd.config import ModelConfig
from detkd.models.detectors import build_detector, rebuild_detector
from detkd.models.lite import LiteFCOSHead, SharedSeparableTower
from detkd.models.taps import DetectorTaps, extract_features


def lite(**overrides) -> nn.Module:
    torch.manual_seed(0)
    options = dict(arch="fcos", backbone="tiny", num_classes=3, min_level=2, max_level=4, design="lite")
    return build_detector(**(options | overrides))


def batch(count: int = 4, size: int = 64):
    targets = [([[8.0, 8.0, 30.0, 26.0]], [1 + i % 3]) for i in range(count)]
    return random_batch(targets, size=size, seed=1, generator=True)


def test_lite_design_is_separable_shared_and_cheaper():
    model = lite()
    head = model.head
    assert isinstance(head, LiteFCOSHead) and isinstance(head.tower, SharedSeparableTower)
    assert model.detkd_config["design"] == "lite"
    # every 3x3 conv of the FPN outputs and of the tower is depthwise (groups == channels) + a 1x1 pointwise
    for block in [*model.backbone.fpn.layer_blocks]:
        depthwise, pointwise = block[0]
        assert depthwise.groups == depthwise.in_channels == 64 and pointwise.kernel_size == (1, 1)
    assert all(conv[0].groups == 64 for conv in head.tower.convs)
    assert len(head.tower.norms) == 3 and all(len(level) == 2 for level in head.tower.norms)  # per level, per layer
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    standard = build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=2, max_level=4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.head) * 3 < count(standard.head) and count(model.backbone) < count(standard.backbone)


def test_lite_trains_and_keeps_per_level_statistics():
    model = lite()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.003)
    images, targets = batch()
    model.train()
    first = None
    for _ in range(15):
        losses = model(images, targets)
        assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
        total = sum(losses.values())
        first = float(total.detach()) if first is None else first
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert float(total.detach()) < first
    norms = model.head.tower.norms
    # each level normalises with its own running statistics (the levels' feature maps differ)
    assert not torch.allclose(norms[0][0].running_mean, norms[1][0].running_mean)
    assert not torch.allclose(norms[0][0].running_var, norms[2][0].running_var)


def test_lite_taps_read_the_logits_the_head_computes():
    model = lite().eval()
    images, _ = batch(2)
    with torch.no_grad(), DetectorTaps(model) as taps:
        model(images)
    features = extract_features(model, images)
    assert list(taps.class_logits) == ["p2", "p3", "p4"] == list(features.class_logits)
    for level in taps.class_logits:
        side = 64 // 2 ** int(level[1:])
        assert taps.class_logits[level].shape == (2, 4, side, side)
        assert torch.allclose(taps.class_logits[level], features.class_logits[level], atol=1e-6)


def test_lite_rebuilds_from_its_config_and_scripts():
    model = lite().eval()
    rebuilt = rebuild_detector(model.detkd_config)
    assert isinstance(rebuilt.head, LiteFCOSHead)
    rebuilt.load_state_dict(model.state_dict())  # strict: the same modules under the same names
    images, _ = batch(1)
    with torch.no_grad():
        want = model(images)[0]
        got = torch.jit.script(rebuilt.eval())(images)[1][0]  # scripted FCOS returns (losses, detections)
    assert torch.equal(want["labels"], got["labels"]) and torch.allclose(want["boxes"], got["boxes"])


def test_old_configs_without_a_design_rebuild_standard():
    config = dict(build_detector(arch="fcos", backbone="tiny", num_classes=2).detkd_config)
    del config["design"]  # checkpoints written before designs existed
    assert not isinstance(rebuild_detector(config).head, LiteFCOSHead)


def test_lite_is_refused_where_it_does_not_apply():
    with pytest.raises(ValidationError, match="design 'lite' is an FCOS design"):
        ModelConfig(arch="retinanet", design="lite")
    with pytest.raises(ValidationError, match="multi-scale teacher"):
        ModelConfig(arch="fcos", design="lite", multiscale=True)
    with pytest.raises(ValueError, match="an FCOS design"):
        build_detector(arch="retinanet", backbone="tiny", num_classes=2, design="lite")
    with pytest.raises(ValueError, match="design: Input should be"):
        build_detector(arch="fcos", backbone="tiny", num_classes=2, design="tiny")
    head = lite().head
    with pytest.raises(ValueError, match="built for 3 pyramid levels, got 2"):
        head.level_outputs([torch.rand(1, 64, 8, 8)] * 2)
