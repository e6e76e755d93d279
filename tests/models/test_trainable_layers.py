"""model.trainable_layers freezes a pretrained body's lower stages as torchvision's trainable_backbone_layers does."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from factories import random_batch
from torch.nn.parallel import DistributedDataParallel
from torchvision import models as tvm
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor

from detkd.config import NETWORK_KEYS, OptimConfig
from detkd.engine.loop import build_optimizer
from detkd.models import build_detector


def _trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("layers", range(6))
def test_resnet_stages_freeze_as_torchvision_freezes_them(layers):
    theirs = _resnet_fpn_extractor(tvm.resnet18(weights=None), layers)
    model = build_detector(arch="fcos", backbone="resnet18", fpn_channels=32, num_classes=2, trainable_layers=layers)
    assert _trainable(model.backbone.body) == _trainable(theirs.body)
    outside = {n for n, _ in model.named_parameters() if not n.startswith("backbone.body.")}
    assert {n for n in _trainable(model) if not n.startswith("backbone.body.")} == outside  # FPN and head train


@pytest.mark.parametrize(("size", "stages"), [("large", 6), ("small", 6)])
def test_mobilenet_stages_freeze_as_torchvisions_extractor_freezes_them(size, stages):
    factory = getattr(tvm, f"mobilenet_v3_{size}")
    for layers in range(stages + 1):
        theirs = _mobilenet_extractor(factory(weights=None), True, layers)
        model = build_detector(
            arch="fcos", backbone=f"mobilenet_v3_{size}", fpn_channels=32, num_classes=2, trainable_layers=layers
        )
        assert _trainable(model.backbone.body) == _trainable(theirs.body), layers
    with pytest.raises(ValueError, match=rf"model.trainable_layers: {stages + 1} is out of range .*0..{stages}"):
        build_detector(backbone=f"mobilenet_v3_{size}", num_classes=2, trainable_layers=stages + 1)


def test_tiny_and_swin_count_stages_from_the_top_and_the_optimizer_skips_the_frozen():
    tiny = build_detector(num_classes=2, fpn_channels=32, trainable_layers=2)
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in _trainable(tiny.backbone.body)} == {
        "stages.2",
        "stages.3",
    }
    with torch.device("meta"):
        swin = build_detector(backbone="swin_t", num_classes=2, fpn_channels=32, trainable_layers=2)
    assert {".".join(n.split(".")[:2]) for n in _trainable(swin.backbone.body)} == {
        f"features.{i}" for i in (4, 5, 6, 7)
    }
    with pytest.raises(ValueError, match="model.trainable_layers: 6 is out of range for backbone tiny: 0..5"):
        build_detector(num_classes=2, fpn_channels=32, trainable_layers=6)
    optimizer = build_optimizer(tiny.parameters(), OptimConfig(), lr=0.1)
    assert (
        sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        == sum(p.numel() for p in tiny.parameters() if p.requires_grad)
        < sum(p.numel() for p in tiny.parameters())
    )
    assert "trainable_layers" not in NETWORK_KEYS and "trainable_layers" not in tiny.detkd_config


def test_ddp_trains_a_detector_with_a_frozen_body(tmp_path):
    """Frozen parameters stay out of DDP's buckets: no find_unused_parameters needed, no gradient for them."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_detector(num_classes=2, fpn_channels=32, min_level=3, max_level=6, trainable_layers=1)
        ddp = DistributedDataParallel(model)
        optimizer = build_optimizer(ddp.parameters(), OptimConfig(), lr=1e-3)
        frozen = [p for p in model.backbone.body.stem.parameters()]
        before = [p.detach().clone() for p in frozen]
        images, targets = random_batch([([[4, 4, 40, 40]], [1]), ([[10, 8, 50, 60]], [2])], size=64)
        ddp.train()
        for _ in range(2):  # a second step fails if DDP waits for gradients that never come
            optimizer.zero_grad()
            sum(ddp(images, targets).values()).backward()
            optimizer.step()
        assert all(p.grad is None for p in frozen) and all(
            torch.equal(a, b) for a, b in zip(before, frozen, strict=True)
        )
        assert model.backbone.body.stages[3][0][0].weight.grad is not None
    finally:
        dist.destroy_process_group()
