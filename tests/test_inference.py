"""Predictor backends without Ray: the eager backend on small images, alone and in mixed-size batches."""

from __future__ import annotations

import torch

from detkd.inference import EagerBackend
from detkd.models import build_detector


def tiny_fcos(fpn_channels: int):
    torch.manual_seed(0)
    return build_detector(
        arch="fcos", backbone="tiny", num_classes=3, min_level=3, max_level=6, fpn_channels=fpn_channels
    )


def test_a_narrow_head_predicts_a_lone_image_whose_top_level_is_1x1():
    # 32 channels: torchvision's GroupNorm(32) would normalise one value per group at 1x1, which torch
    # refuses for a batch of one; detkd's heads keep two channels per group
    backend = EagerBackend(tiny_fcos(32))
    alone = backend.detect([torch.rand(3, 64, 64)], score_thresh=0.0, detections_per_img=10)
    assert len(alone) == 1 and alone[0]["boxes"].shape == (10, 4)


def test_mixed_sizes_give_each_image_its_own_detections():
    backend = EagerBackend(tiny_fcos(64))
    small, large = torch.rand(3, 64, 72), torch.rand(3, 80, 64)
    together = backend.detect([small, large], score_thresh=0.05, detections_per_img=10)
    alone = [backend.detect([image], score_thresh=0.05, detections_per_img=10)[0] for image in (small, large)]
    for mixed, single in zip(together, alone, strict=True):
        assert torch.allclose(mixed["scores"], single["scores"], atol=1e-5)
        assert torch.allclose(mixed["boxes"], single["boxes"], atol=1e-3)
