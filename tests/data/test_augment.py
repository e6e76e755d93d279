"""Box-aware augmentation: on images whose objects are known, every surviving box still covers its object.

Each scene is a noise background with solid rectangles and ellipses of distinct saturated colours, one
label per object, so after any op the object's true extent is read back from the pixels (its colour
mask) and compared with the box that carries its label.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import tv_tensors
from torchvision.transforms import v2

from detkd.config import AugmentConfig, Config, ConfigError, InputConfig, validate_config
from detkd.data.augment import (
    RandomIoUCrop,
    RandomPhotometricDistort,
    RandomShortSide,
    RandomZoomOut,
    ScaleJitterCanvas,
    reference_transform,
)
from detkd.data.transforms import (
    MIN_BOX_SIDE,
    RandomHorizontalFlip,
    ResizeShortSide,
    sanitize_boxes,
    scale_by,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]
# (shape, x1, y1, x2, y2) in pixels of a 96 x 128 (h x w) scene; label k + 1 has COLOURS[k]
OBJECTS = [
    ("rect", 4, 6, 30, 26),
    ("ellipse", 40, 10, 70, 44),
    ("rect", 100, 2, 126, 20),  # touches the right border
    ("ellipse", 8, 56, 36, 90),
    ("rect", 60, 60, 64, 64),  # small: 4 px
    ("rect", 90, 50, 124, 94),
]
MASK_TOLERANCE = 0.3  # colour distance; interior pixels are exact, blended edges are not counted
BOX_TOLERANCE = 2.0  # px between a box and its object's mask after interpolation


def scene(height: int = 96, width: int = 128, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Noise in [0.35, 0.65] per channel (far from every object colour) with the OBJECTS drawn on it."""
    rng = np.random.default_rng(seed)
    background = rng.integers(90, 166, (height, width, 3), dtype=np.uint8)
    picture = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(picture)
    boxes = []
    for k, (shape, x1, y1, x2, y2) in enumerate(OBJECTS):
        # PIL fills x1..x2-1 inclusive when given x2 - 1: the object covers exactly [x1, x2) x [y1, y2)
        (draw.rectangle if shape == "rect" else draw.ellipse)((x1, y1, x2 - 1, y2 - 1), fill=COLOURS[k])
        boxes.append([x1, y1, x2, y2])
    image = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.arange(1, len(OBJECTS) + 1),
        "image_id": 1,
        "orig_size": (height, width),
        "scale": torch.ones(2),
    }
    return image, target


def object_extent(image: torch.Tensor, label: int) -> tuple[float, float, float, float] | None:
    """The bounding box [x1, y1, x2) x [y1, y2) of the pixels of this label's colour, or None."""
    colour = torch.tensor(COLOURS[label - 1], dtype=torch.float32).view(3, 1, 1) / 255
    mask = (image - colour).norm(dim=0) < MASK_TOLERANCE
    if not mask.any():
        return None
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def check_boxes_cover_objects(
    image: torch.Tensor, target: dict, *, tolerance: float = BOX_TOLERANCE, dropped: frozenset[int] = frozenset()
) -> set[int]:
    """Every box equals its object's visible extent (within ``tolerance``), is inside the image and at least
    MIN_BOX_SIDE a side; every object without a box is gone or a sliver, except the ``dropped`` ones (an IoU
    crop drops objects whose centre left it, visible or not). Returns the labels kept."""
    height, width = image.shape[-2:]
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.shape == (len(labels), 4) and labels.dtype == torch.int64
    kept = [int(v) for v in labels]
    assert len(set(kept)) == len(kept)  # one box per object: labels stay paired with their boxes
    for box, label in zip(boxes.tolist(), kept, strict=True):
        x1, y1, x2, y2 = box
        assert 0 <= x1 and 0 <= y1 and x2 <= width and y2 <= height, (label, box)
        assert x2 - x1 >= MIN_BOX_SIDE and y2 - y1 >= MIN_BOX_SIDE, (label, box)
        extent = object_extent(image, label)
        if extent is None:  # a sliver too thin for an interior pixel
            assert min(x2 - x1, y2 - y1) <= 2 * tolerance, (label, box)
            continue
        # the box holds the visible object; it is its exact extent unless an ellipse was cut by the border
        # (then the box is the clipped ellipse box, wider than the visible part)
        covers = [box[0] - extent[0], box[1] - extent[1], extent[2] - box[2], extent[3] - box[3]]
        assert max(covers) <= tolerance, (label, box, extent)
        cut = x1 <= 0 or y1 <= 0 or x2 >= width or y2 >= height
        if OBJECTS[label - 1][0] == "rect" or not cut:
            assert max(abs(a - b) for a, b in zip(box, extent, strict=True)) <= tolerance, (label, box, extent)
    for label in set(range(1, len(OBJECTS) + 1)) - set(kept) - dropped:
        extent = object_extent(image, label)
        assert extent is None or min(extent[2] - extent[0], extent[3] - extent[1]) <= tolerance, (label, extent)
    return set(kept)


def test_the_scene_boxes_are_the_object_extents():
    image, target = scene()
    assert check_boxes_cover_objects(image, target, tolerance=0.0) == set(range(1, 7))


def test_hflip_keeps_every_box_on_its_object():
    image, target = scene()
    out_image, out = RandomHorizontalFlip(1.0)(image, target)
    assert check_boxes_cover_objects(out_image, out, tolerance=0.0) == set(range(1, 7))


@pytest.mark.parametrize("seed", range(4))
def test_short_side_jitter_draws_sizes_in_range_and_moves_boxes_with_the_pixels(seed):
    torch.manual_seed(seed)
    image, target = scene()
    sides = set()
    for _ in range(6):
        out_image, out = RandomShortSide(40, 80, max_size=100)(image, target)
        h, w = out_image.shape[-2:]
        sides.add(min(h, w))
        assert 40 <= min(h, w) <= 80 and max(h, w) <= 100
        assert torch.allclose(out["scale"], torch.tensor([w / 128, h / 96]))
        check_boxes_cover_objects(out_image, out)
    assert len(sides) > 1


def test_short_side_jitter_is_reproducible_from_torch_seed():
    image, target = scene()
    torch.manual_seed(5)
    a = RandomShortSide(40, 80)(image, target)
    torch.manual_seed(5)
    b = RandomShortSide(40, 80)(image, target)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])


@pytest.mark.parametrize("seed", range(6))
def test_large_scale_jitter_fills_a_fixed_canvas_and_drops_only_objects_that_left_it(seed):
    torch.manual_seed(seed)
    image, target = scene()
    op = ScaleJitterCanvas(ratio=(0.3, 2.0), size=64, max_size=None, canvas=64, fill=(0.0, 0.0, 0.0))
    out_image, out = op(image, target)
    assert out_image.shape == (3, 64, 64)
    check_boxes_cover_objects(out_image, out)


def test_large_scale_jitter_pads_bottom_right_with_fill_and_keeps_all_when_small():
    torch.manual_seed(0)
    image, target = scene()
    fill = (0.0, 0.0, 0.0)
    op = ScaleJitterCanvas(ratio=(0.5, 0.5), size=96, max_size=None, canvas=96, fill=fill)
    out_image, out = op(image, target)  # 96 x 128 at half the reference factor (1.0): 48 x 64 on 96 x 96
    assert out_image.shape == (3, 96, 96)
    assert torch.equal(out_image[:, 48:, :], torch.zeros(3, 48, 96))  # padded with fill below and right
    assert torch.equal(out_image[:, :, 64:], torch.zeros(3, 96, 32))
    assert torch.allclose(out["scale"], torch.tensor([0.5, 0.5]))
    assert torch.allclose(out["boxes"], target["boxes"] * 0.5)
    assert check_boxes_cover_objects(out_image, out) == set(range(1, 7))


@pytest.mark.parametrize("seed", range(4))
def test_zoom_out_moves_every_box_with_its_object_exactly(seed):
    torch.manual_seed(seed)
    image, target = scene()
    out_image, out = RandomZoomOut(p=1.0, max_ratio=3.0, fill=(0.0, 0.0, 0.0))(image, target)
    assert out_image.shape[-1] >= 128 and out_image.shape[-2] >= 96
    assert check_boxes_cover_objects(out_image, out, tolerance=0.0) == set(range(1, 7))
    offset = out["boxes"] - target["boxes"]
    assert torch.equal(offset, offset[:1].expand_as(offset))  # one translation for all


def _crop_offset(image: torch.Tensor, crop: torch.Tensor) -> tuple[int, int]:
    """(top, left) of ``crop`` inside ``image``: the crop is an exact sub-array (noise makes it unique)."""
    h, w = crop.shape[-2:]
    for top in range(image.shape[-2] - h + 1):
        for left in range(image.shape[-1] - w + 1):
            if torch.equal(image[:, top : top + h, left : left + w], crop):
                return top, left
    raise AssertionError("the crop is not a window of the image")


def check_iou_crop(image: torch.Tensor, target: dict, out_image: torch.Tensor, out: dict) -> frozenset[int]:
    """The crop keeps exactly the boxes whose centre is inside it and that keep MIN_BOX_SIDE a side once clipped;
    returns the labels it dropped while (part of) the object is still in view."""
    top, left = _crop_offset(image, out_image)
    h, w = out_image.shape[-2:]
    kept = {int(v) for v in out["labels"]}
    in_view = set()
    for label, (x1, y1, x2, y2) in zip(target["labels"].tolist(), target["boxes"].tolist(), strict=True):
        cx, cy = (x1 + x2) / 2 - left, (y1 + y2) / 2 - top
        centre_inside = 0 < cx < w and 0 < cy < h
        clipped = (min(x2 - left, w) - max(x1 - left, 0), min(y2 - top, h) - max(y1 - top, 0))
        assert (label in kept) == (centre_inside and min(clipped) >= MIN_BOX_SIDE), (label, centre_inside, clipped)
        if not centre_inside and min(clipped) > 0:
            in_view.add(label)
    check_boxes_cover_objects(out_image, out, tolerance=0.0, dropped=frozenset(in_view))
    return frozenset(in_view)


@pytest.mark.parametrize("seed", range(8))
def test_iou_crop_keeps_boxes_on_their_objects_and_drops_exactly_those_whose_centre_left(seed):
    torch.manual_seed(seed)
    image, target = scene(seed=seed)
    out_image, out = RandomIoUCrop(p=1.0)(image, target)
    check_iou_crop(image, target, out_image, out)


def test_iou_crop_leaves_an_image_without_boxes_alone_and_needs_the_keep_option():
    image, target = scene()
    empty = {**target, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out_image, out = RandomIoUCrop(p=1.0, sampler_options=[0.0, 1.0])(image, empty)
    assert out_image is image and out["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match="1.0"):
        RandomIoUCrop(sampler_options=[0.5])


def test_photometric_distortion_changes_pixels_only():
    torch.manual_seed(0)
    image, target = scene()
    out_image, out = RandomPhotometricDistort(
        p=1.0, brightness=(0.6, 0.6), contrast=(1.2, 1.2), saturation=(0.5, 0.5), hue=(0.1, 0.1)
    )(image, target)
    assert out_image.shape == image.shape and not torch.equal(out_image, image)
    assert 0 <= out_image.min() and out_image.max() <= 1
    assert torch.equal(out["boxes"], target["boxes"]) and torch.equal(out["labels"], target["labels"])


def _full_augment(**extra) -> InputConfig:
    augment = {
        "hflip": 0.5,
        "scale_jitter": {"short_side": [48, 112], **extra.pop("scale_jitter", {})},
        "zoom_out": {"p": 0.5, "max_ratio": 2.5},
        "iou_crop": {"p": 0.8},
        **extra,
    }
    return InputConfig.model_validate({"size": 96, "max_size": 160, "augment": augment})


@pytest.mark.parametrize("seed", range(10))
def test_the_composition_keeps_boxes_on_objects_after_every_step_and_photometric_moves_none(seed):
    image, target = scene(seed=seed)
    transform = reference_transform(_full_augment())
    torch.manual_seed(seed)
    dropped: frozenset[int] = frozenset()
    step_image, step_target = image, target
    for step in transform.transforms:  # one step at a time: the same draws as the composition
        out_image, out = step(step_image, step_target)
        if isinstance(step, RandomIoUCrop):
            dropped |= check_iou_crop(step_image, step_target, out_image, out)
        else:
            check_boxes_cover_objects(out_image, out, dropped=dropped)
        step_image, step_target = out_image, out
    torch.manual_seed(seed)
    out_image, out = transform(image, target)
    assert torch.equal(out_image, step_image) and torch.equal(out["boxes"], step_target["boxes"])
    out = sanitize_boxes(out, height=out_image.shape[-2], width=out_image.shape[-1])  # the dataset's last step
    check_boxes_cover_objects(out_image, out, dropped=dropped)
    # photometric runs last: with the same seed the geometry is the same
    torch.manual_seed(seed)
    photo_image, photo = reference_transform(_full_augment(photometric={"p": 0.5}))(image, target)
    photo = sanitize_boxes(photo, height=photo_image.shape[-2], width=photo_image.shape[-1])
    assert photo_image.shape == out_image.shape
    assert torch.equal(photo["boxes"], out["boxes"]) and torch.equal(photo["labels"], out["labels"])


@pytest.mark.parametrize("seed", range(4))
def test_the_student_view_is_the_augmented_view_scaled(seed):
    image, target = scene(seed=seed)
    torch.manual_seed(seed)
    ref_image, ref = reference_transform(_full_augment(scale_jitter={"short_side": [64, 64]}))(image, target)
    ref = sanitize_boxes(ref, height=ref_image.shape[-2], width=ref_image.shape[-1])
    small_image, small = scale_by(ref_image, ref, factor=0.5)
    h, w = ref_image.shape[-2:]
    assert small_image.shape[-2:] == (round(h / 2), round(w / 2))
    ratio = torch.tensor([small_image.shape[-1] / w, small_image.shape[-2] / h] * 2)
    assert torch.equal(small["boxes"], ref["boxes"] * ratio) and torch.equal(small["labels"], ref["labels"])


def test_default_augment_is_the_old_training_view():
    steps = reference_transform(InputConfig(size=64)).transforms
    assert [type(s) for s in steps] == [ResizeShortSide, RandomHorizontalFlip] and steps[1].p == 0.5
    assert [type(s) for s in reference_transform(InputConfig(size=64, augment={"hflip": 0})).transforms] == [
        ResizeShortSide
    ]


def test_sanitize_boxes_is_torchvisions_clamp_and_sanitize():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.rand(500, 4, generator=gen) * 80 - 10
    boxes[:, 2:] = boxes[:, :2] + torch.rand(500, 2, generator=gen) * 6 - 1  # many thin or inverted boxes
    labels = torch.arange(500)
    ours = sanitize_boxes({"boxes": boxes, "labels": labels, "iscrowd": labels % 2}, height=50, width=60)
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(50, 60))
    theirs = v2.SanitizeBoundingBoxes(min_size=MIN_BOX_SIDE)(v2.ClampBoundingBoxes()({"boxes": bb, "labels": labels}))
    assert 0 < len(ours["boxes"]) < 500
    assert torch.equal(ours["boxes"], theirs["boxes"].as_subclass(torch.Tensor))
    assert torch.equal(ours["labels"], theirs["labels"]) and torch.equal(ours["iscrowd"], theirs["labels"] % 2)


# --- configuration ---------------------------------------------------------------------------------------------


def test_input_hflip_is_read_as_augment_hflip():
    cfg = Config.model_validate({"input": {"size": 64, "hflip": 0.25}})
    assert cfg.input.augment.hflip == 0.25 and "hflip" not in cfg.input.model_dump()
    assert Config.model_validate(cfg.model_dump()) == cfg  # a stored new-style config reads back
    assert Config.model_validate({"input": {"hflip": 0.0, "augment": {"iou_crop": {}}}}).input.augment.hflip == 0.0


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ({"scale_jitter": {}}, "exactly one of short_side"),
        ({"scale_jitter": {"short_side": [64, 32]}}, "short_side: \\[64, 32\\] is not a range"),
        ({"scale_jitter": {"short_side": [32, 64], "ratio": [0.5, 2]}}, "exactly one"),
        ({"scale_jitter": {"ratio": [0, 2]}}, "ratio: values must be > 0"),
        ({"scale_jitter": {"ratio": [2, 1]}}, "ratio: \\[2.0, 1.0\\] is not a range"),
        ({"scale_jitter": {"ratio": [0.5, 2], "fill": [0, 0, 2]}}, "fill"),
        ({"scale_jitter": {"short_side": [32, 64], "fill": [0, 0, 0]}}, "fill: only ratio"),
        ({"iou_crop": {"sampler_options": [0.3, 0.5]}}, "must include 1.0"),
        ({"iou_crop": {"min_scale": 0.9, "max_scale": 0.5}}, "min_scale/max_scale"),
        ({"zoom_out": {"max_ratio": 0.5}}, "max_ratio"),
        ({"photometric": {"hue": [-0.1, 0.7]}}, "hue"),
        ({"photometric": {"contrast": [1.5, 0.5]}}, "contrast"),
        ({"hflip": 1.5}, "hflip"),
        ({"cutout": {}}, "cutout: unknown key"),
    ],
)
def test_bad_augment_settings_are_refused_naming_the_key(augment, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate_config({"input": {"augment": augment}}, source="run.yaml")
    assert str(info.value).startswith("run.yaml: input.augment")


def test_every_augment_setting_survives_a_dump_and_reload():
    full = {
        "hflip": 0.3,
        "scale_jitter": {"short_side": [32, 64]},
        "iou_crop": {"trials": 5},
        "zoom_out": {"fill": [0, 0, 0]},
        "photometric": {"p": 0.1},
    }
    cfg = Config.model_validate({"input": {"augment": full}})
    assert Config.model_validate(cfg.model_dump()) == cfg
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg


def test_giving_both_flip_keys_is_refused():
    with pytest.raises(ConfigError, match="run.yaml: input: .*give the flip probability once"):
        validate_config({"input": {"hflip": 0.5, "augment": {"hflip": 0.5}}}, source="run.yaml")


def test_augment_defaults_are_flip_only():
    augment = AugmentConfig()
    assert augment.hflip == 0.5 and augment.ops() == {}
