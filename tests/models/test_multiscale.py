"""C-FF as in MSAD's reference: one shared module, FC 2C -> 2C/16 -> 2 without bias, one pair per sample and level."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detkd.models import MultiScaleDetector, build_detector
from detkd.models.multiscale import CrossFeatureFusion, level_shift


def test_fusion_layer_shapes_match_the_reference():
    fusion = CrossFeatureFusion(256)
    linears = [m for m in fusion.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 32), (32, 2)]
    assert all(m.bias is None for m in linears)
    assert any(isinstance(m, nn.ReLU) for m in fusion.modules())


def test_fusion_weights_are_a_softmax_pair_per_sample_and_mix_the_inputs():
    torch.manual_seed(0)
    fusion = CrossFeatureFusion(32)
    high, low = torch.randn(3, 32, 4, 4), torch.randn(3, 32, 4, 4)
    fused, w = fusion(high, low)
    assert w.shape == (3, 2)
    assert torch.allclose(w.sum(dim=1), torch.ones(3)) and (w > 0).all()
    assert not torch.allclose(w[0], w[1])  # per sample, not one pair for the batch
    pooled = torch.cat([high, low], dim=1).mean(dim=(2, 3))
    expected_w = torch.softmax(fusion.fc[2](torch.relu(fusion.fc[0](pooled))), dim=1)
    assert torch.allclose(w, expected_w, atol=1e-6)
    assert torch.allclose(fused, w[:, 0, None, None, None] * high + w[:, 1, None, None, None] * low, atol=1e-6)
    assert torch.allclose(fusion.weights(high, low), w)


def _teacher() -> MultiScaleDetector:
    torch.manual_seed(0)
    return build_detector(arch="fcos", backbone="tiny", num_classes=2, fpn_channels=32, multiscale=True)


def test_one_fusion_module_is_shared_by_all_levels():
    model = _teacher()
    fusion_keys = sorted(k for k in model.state_dict() if not k.startswith("detector."))
    assert fusion_keys == ["fusion.fc.0.weight", "fusion.fc.2.weight"]
    assert not hasattr(model, "fusions")
    calls = []
    model.fusion.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[-1]))
    model.eval()
    with torch.no_grad():
        fused = model.fused_pyramid([torch.rand(3, 128, 128), torch.rand(3, 128, 128)])
    assert list(fused) == ["p3", "p4", "p5", "p6", "p7"]
    assert calls == [16, 8, 4, 2, 1]  # the same module, once per level
    assert list(model.last_fusion_weights) == list(fused)
    for weights in model.last_fusion_weights.values():
        assert weights.shape == (2, 2) and torch.allclose(weights.sum(dim=1), torch.ones(2))


def test_multiscale_teacher_trains_all_three_branches():
    model = _teacher()
    model.train()
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 70.0]]), "labels": torch.tensor([1])}] * 2
    losses = model([torch.rand(3, 128, 128), torch.rand(3, 128, 128)], targets)
    assert {k.split("_")[0] for k in losses} == {"high", "low", "fused"}
    sum(losses.values()).backward()
    assert model.fusion.fc[0].weight.grad is not None and model.fusion.fc[0].weight.grad.abs().sum() > 0


def test_level_shift():
    assert level_shift(0.5) == 1 and level_shift(0.25) == 2
    for bad in (0.3, 1.0, 2.0, 0.0, -0.5):
        with pytest.raises(ValueError, match="1/2\\*\\*k"):
            level_shift(bad)
    with pytest.raises(ValueError, match="one-stage"):
        build_detector(arch="fasterrcnn", backbone="tiny", num_classes=2, multiscale=True)
    with pytest.raises(ValueError, match="use min_level >= 3"):
        build_detector(arch="fcos", backbone="tiny", num_classes=2, min_level=2, multiscale=True)
    with pytest.raises(ValueError, match="anchor_sizes has 1 levels"):
        build_detector(arch="fcos", backbone="tiny", num_classes=2, max_level=4, anchor_sizes=[[8.0]], multiscale=True)
