"""Predictor backends without Ray: the eager backend on sizes that break torch's GroupNorm check."""

from __future__ import annotations

import pytest
import torch

from detkd.inference import EagerBackend
from detkd.models import build_detector


def tiny_fcos(fpn_channels: int):
    torch.manual_seed(0)
    return build_detector(
        arch="fcos", backbone="tiny", num_classes=3, min_level=3, max_level=6, fpn_channels=fpn_channels
    )


def test_one_value_per_group_gets_a_clear_error():
    backend = EagerBackend(tiny_fcos(32))
    with pytest.raises(ValueError, match=r"\(64, 64\) image leaves this detector's top pyramid level at 1x1"):
        backend.detect([torch.rand(3, 64, 64)], score_thresh=0.05, detections_per_img=10)
    # the same image in a batch of two, or a larger image alone, is fine
    assert len(backend.detect([torch.rand(3, 64, 64)] * 2, score_thresh=0.05, detections_per_img=10)) == 2
    assert len(backend.detect([torch.rand(3, 96, 96)], score_thresh=0.05, detections_per_img=10)) == 1


def test_mixed_sizes_give_each_image_its_own_detections():
    backend = EagerBackend(tiny_fcos(64))
    small, large = torch.rand(3, 64, 72), torch.rand(3, 80, 64)
    together = backend.detect([small, large], score_thresh=0.05, detections_per_img=10)
    alone = [backend.detect([image], score_thresh=0.05, detections_per_img=10)[0] for image in (small, large)]
    for mixed, single in zip(together, alone, strict=True):
        assert torch.allclose(mixed["scores"], single["scores"], atol=1e-5)
        assert torch.allclose(mixed["boxes"], single["boxes"], atol=1e-3)
