"""Predictor without Ray: its input view against the evaluation transform, the eager backend on small
images alone and in mixed-size batches, and the exported backend's threshold and cap."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_fcos

from detkd.data.transforms import eval_transform
from detkd.records import InputSpec
from detkd.serving.predictor import EagerBackend, ExportedBackend, Predictor


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


def spec(size: int, max_size: int | None, scale: float) -> InputSpec:
    return InputSpec(size=size, max_size=max_size, scale=scale, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.mark.parametrize(
    ("input_spec", "shape"),
    [
        (spec(128, None, 0.5), (3, 128, 128)),  # already at the teacher's view: one halving
        (spec(128, None, 0.5), (3, 97, 140)),  # both steps resize, odd sizes round
        (spec(64, 80, 1.0), (3, 120, 300)),  # the long-side cap decides
        (spec(64, None, 1.0), (3, 64, 90)),  # nothing to resize
    ],
)
def test_predictor_prepares_the_evaluation_view_and_maps_boxes_back(input_spec, shape):
    # the predictor sizes and resizes without the transform's box bookkeeping; its image and scale
    # must still be the evaluation view's, or deployed detections would drift from the measured AP
    predictor = Predictor(EagerBackend(tiny_fcos(32)), input_spec=input_spec, categories=[(7, "a"), (9, "b")])
    image = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    expected, target = eval_transform(input_spec)(image, {"boxes": torch.zeros((0, 4))})
    (prepared,), (scale,) = predictor.prepare([image])
    assert prepared.shape == expected.shape
    assert torch.allclose(prepared, expected, atol=1e-6)
    assert scale == pytest.approx(target.get("scale", torch.ones(2)).tolist(), rel=1e-6)
    output = {
        "boxes": torch.tensor([[2.0, 4.0, 10.0, 12.0], [0.0, 0.0, 1.0, 1.0]]),
        "scores": torch.tensor([0.9, 0.5]),
        "labels": torch.tensor([2, 5]),  # label 5 is not one of the two categories: dropped
    }
    detections = predictor.to_original(output, scale)
    x, y = scale
    assert detections.boxes == [[round(2 / x, 2), round(4 / y, 2), round(10 / x, 2), round(12 / y, 2)]]
    assert detections.scores == [0.9] and detections.category_ids == [9] and detections.names == ["b"]


def test_exported_backend_applies_a_higher_threshold_and_a_smaller_cap():
    # a graph's outputs pass untouched when its baked threshold and cap are the ones asked for
    outputs = (torch.rand(3, 4), torch.tensor([0.9, 0.6, 0.35]), torch.tensor([1, 2, 1]))
    backend = ExportedBackend(lambda image: outputs, score_thresh=0.3, detections_per_img=100, path="m.onnx")
    image = [torch.rand(3, 8, 8)]
    same = backend.detect(image, score_thresh=0.3, detections_per_img=100)[0]
    assert same["scores"].tolist() == pytest.approx([0.9, 0.6, 0.35])
    higher = backend.detect(image, score_thresh=0.5, detections_per_img=100)[0]
    assert higher["scores"].tolist() == pytest.approx([0.9, 0.6]) and higher["labels"].tolist() == [1, 2]
    capped = backend.detect(image, score_thresh=0.3, detections_per_img=1)[0]
    assert capped["boxes"].shape == (1, 4) and capped["labels"].tolist() == [1]
    with pytest.raises(ValueError, match="exported with score threshold 0.3"):
        backend.detect(image, score_thresh=0.1, detections_per_img=100)
