"""transforms: exact geometry and scale bookkeeping, no mutation of inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from detkd.data.transforms import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortSide,
    ScaleBy,
    hflip,
    resize_short_side,
    scale_batch,
    scale_by,
    to_tensor,
)

BOXES = [[10.0, 6.0, 50.0, 40.0], [0.0, 0.0, 128.0, 96.0], [100.5, 70.25, 120.75, 90.0]]


def _sample(h: int = 96, w: int = 128, boxes: list[list[float]] = BOXES):
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.arange(1, len(boxes) + 1, dtype=torch.int64),
        "image_id": 7,
        "orig_size": (h, w),
        "scale": torch.tensor([1.0, 1.0]),
    }
    return image, target


def test_scale_by_half_is_exact() -> None:
    image, target = _sample()
    small, small_target = scale_by(image, target, factor=0.5)
    assert small.shape == (3, 48, 64)
    assert torch.equal(small_target["boxes"], target["boxes"] / 2)
    assert torch.equal(small_target["scale"], torch.tensor([0.5, 0.5]))
    assert torch.equal(small_target["labels"], target["labels"])
    assert small_target["orig_size"] == (96, 128)
    # antialiased: a 2x2 average-like filter keeps the mean intensity
    assert abs(small.mean().item() - image.mean().item()) < 1e-2


def test_scale_by_is_deterministic() -> None:
    image, target = _sample()
    a, ta = scale_by(image, target, factor=0.5)
    b, tb = scale_by(image, target, factor=0.5)
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])


def test_resize_then_scale_then_unscale_recovers_original_boxes() -> None:
    image, target = _sample(h=90, w=131)
    image, t = resize_short_side(image, target, size=200, max_size=1000)
    assert min(image.shape[-2:]) == 200
    image, t = scale_by(image, t, factor=0.37)
    recovered = t["boxes"] / t["scale"].repeat(2)
    assert torch.allclose(recovered, target["boxes"], atol=1e-4)
    # per-axis ratios are the actual ones
    assert t["scale"][0].item() == pytest.approx(image.shape[-1] / 131)
    assert t["scale"][1].item() == pytest.approx(image.shape[-2] / 90)


def test_resize_short_side_caps_long_side() -> None:
    image, target = _sample(h=50, w=400)
    resized, t = resize_short_side(image, target, size=100, max_size=600)
    assert resized.shape[-2:] == (75, 600)
    assert torch.allclose(t["boxes"], target["boxes"] * 1.5)
    uncapped, _ = resize_short_side(image, target, size=100)
    assert uncapped.shape[-2:] == (100, 800)


def test_hflip_twice_is_identity() -> None:
    image, target = _sample()
    flipped, ft = hflip(image, target)
    assert torch.equal(ft["boxes"][0], torch.tensor([78.0, 6.0, 118.0, 40.0]))
    assert torch.equal(flipped[..., 0], image[..., -1])
    back, bt = hflip(flipped, ft)
    assert torch.equal(back, image)
    assert torch.equal(bt["boxes"], target["boxes"])


def test_hflip_commutes_with_scale() -> None:
    image, target = _sample()
    a_img, a = scale_by(*hflip(image, target), factor=0.5)
    b_img, b = hflip(*scale_by(image, target, factor=0.5))
    assert torch.allclose(a["boxes"], b["boxes"], atol=1e-5)
    assert torch.allclose(a_img, b_img, atol=1e-6)


def test_scale_batch_does_not_mutate_inputs() -> None:
    images, targets = zip(*[_sample(), _sample(h=64, w=64, boxes=[[1.0, 2.0, 3.0, 4.0]])], strict=True)
    images, targets = list(images), list(targets)
    before = [
        (i.clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in t.items()})
        for i, t in zip(images, targets, strict=True)
    ]

    small_images, small_targets = scale_batch(images, targets, factor=0.5)

    assert [tuple(i.shape) for i in small_images] == [(3, 48, 64), (3, 32, 32)]
    assert torch.equal(small_targets[1]["boxes"], torch.tensor([[0.5, 1.0, 1.5, 2.0]]))
    for (image, target), (old_image, old_target) in zip(zip(images, targets, strict=True), before, strict=True):
        assert torch.equal(image, old_image)
        assert torch.equal(target["boxes"], old_target["boxes"])
        assert torch.equal(target["scale"], old_target["scale"])
    assert all(new is not old for new, old in zip(small_targets, targets, strict=True))


def test_random_flip_follows_torch_seed_and_compose() -> None:
    image, target = _sample()
    pipeline = Compose([RandomHorizontalFlip(0.5), ResizeShortSide(48), ScaleBy(0.5)])

    def run() -> list[torch.Tensor]:
        torch.manual_seed(123)
        return [pipeline(image, target)[1]["boxes"] for _ in range(8)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert len({tuple(b[0].tolist()) for b in first}) == 2  # both outcomes occurred
    torch.manual_seed(0)
    outcomes = {bool(torch.equal(RandomHorizontalFlip(0.5)(image, target)[0], image)) for _ in range(20)}
    assert outcomes == {True, False}
    assert torch.equal(RandomHorizontalFlip(1.0)(image, target)[0], image.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(image, target)[0], image)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_to_tensor_always_gives_three_channels(mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        image = Image.fromarray(np.full((5, 7), 65535, dtype=np.uint16))
        assert image.mode.startswith("I;16")
    elif mode == "P":
        image = rgb.convert("P")
    else:
        image = rgb.convert(mode)
    tensor = to_tensor(image)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min().item() <= tensor.max().item() <= 1.0
    if mode == "RGB":
        assert torch.allclose(tensor, torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255)
    if mode == "I;16":
        assert torch.all(tensor == 1.0)


def test_short_side_sizes_round_and_allow_max_size_equal_to_size() -> None:
    # our rule rounds (torchvision's truncates: 170 here) and accepts max_size == size (torchvision refuses)
    image, target = _sample(h=120, w=160)
    resized, t = resize_short_side(image, target, size=128, max_size=256)
    assert resized.shape[-2:] == (128, 171)
    assert torch.equal(t["boxes"], target["boxes"] * t["scale"].repeat(2))
    capped, _ = resize_short_side(image, target, size=64, max_size=64)
    assert capped.shape[-2:] == (48, 64)
