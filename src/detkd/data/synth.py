"""Synthetic shape detection datasets, written as COCO.

Tests, quickstarts and benchmarks need a detection dataset that exists offline,
builds in seconds and is hard in the right way: classes differ by SHAPE only
(colours are random and chosen to contrast with what lies beneath), sizes are
log-uniform so small objects are common, and clutter (line segments, irregular
blobs, partial arcs, a smooth background) gives false-positive bait. At half
resolution the small shapes become genuinely ambiguous, which is the regime
low-resolution distillation is about.

Images are square (``size`` x ``size``) by default; ``aspect_ratios`` and
``size_jitter`` give each image its own width and height, as real datasets have,
while objects keep their pixel sizes and stay inside the image.

Every image is drawn from its own generator seeded by ``(seed, index)`` (its size
from ``(seed, index, 1)``), so the output does not depend on the order or the
number of images drawn before it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["SHAPES", "SynthSpec", "image_size", "render_image", "synthesize"]

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
MIN_CONTRAST = 0.35  # luminance gap between an object and what lies beneath it
PLACEMENT_TRIES = 30
SPLITS = ("train", "val", "test")

Box4 = tuple[int, int, int, int]  # x, y, w, h in supersampled pixels


# --------------------------------------------------------------------------- shapes
# Each function draws a filled shape (255) into a fresh mask of exactly s x s
# supersampled pixels, touching all four edges so the box is tight.


def _square(draw: ImageDraw.ImageDraw, s: int) -> None:
    draw.rectangle((0, 0, s - 1, s - 1), fill=255)


def _circle(draw: ImageDraw.ImageDraw, s: int) -> None:
    draw.ellipse((0, 0, s - 1, s - 1), fill=255)


def _triangle(draw: ImageDraw.ImageDraw, s: int) -> None:
    draw.polygon([((s - 1) / 2, 0), (s - 1, s - 1), (0, s - 1)], fill=255)


def _cross(draw: ImageDraw.ImageDraw, s: int) -> None:
    t = max(1, round(s * 0.34))
    a = (s - t) // 2
    draw.rectangle((0, a, s - 1, a + t - 1), fill=255)
    draw.rectangle((a, 0, a + t - 1, s - 1), fill=255)


def _ring(draw: ImageDraw.ImageDraw, s: int) -> None:
    draw.ellipse((0, 0, s - 1, s - 1), fill=255)
    t = max(1, round(s * 0.22))
    if s - 1 - 2 * t > 0:
        draw.ellipse((t, t, s - 1 - t, s - 1 - t), fill=0)


def _diamond(draw: ImageDraw.ImageDraw, s: int) -> None:
    m = (s - 1) / 2
    draw.polygon([(m, 0), (s - 1, m), (m, s - 1), (0, m)], fill=255)


SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, int], None]] = {
    "square": _square,
    "circle": _circle,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
    "diamond": _diamond,
}


# --------------------------------------------------------------------------- spec


class SynthSpec(BaseModel):
    """What to generate. Sizes are in output pixels; the defaults make a small benchmark.

    The one spec of a synthetic dataset: the generator takes it, a pipeline's
    ``data.synth`` section is one, and ``detkd data synth`` builds one from its
    options, so their fields, defaults and checks cannot drift apart.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: int = Field(400, ge=1, description="images in all, train plus val")
    test_images: int = Field(
        0, ge=0, description="extra images written as a held-out test split (train and val stay the same)"
    )
    size: int = Field(128, ge=16, description="nominal image side in px (exact when the images are square)")
    seed: int = Field(0, ge=0, description="same seed, same data")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="share of the images written as the val split")
    classes: tuple[str, ...] = Field(
        ("square", "circle", "triangle"), description=f"shape names (a list or comma-separated), from {sorted(SHAPES)}"
    )
    min_object: float = Field(4.0, ge=1, description="smallest object, px (side of its tight box)")
    max_object: float = Field(48.0, ge=1, description="largest object, px; must fit in the smallest image side")
    max_objects: int = Field(6, ge=1, description="objects per image at most (at least 1 is always drawn)")
    clutter: float = Field(0.5, ge=0, le=1, description="distractor count and background gradient strength")
    noise: float = Field(0.03, ge=0, le=1, description="gaussian pixel noise sigma on the 0..1 scale")
    overlap: float = Field(0.3, ge=0, le=1, description="max IoU between two objects")
    aspect_ratios: tuple[float, float] = Field(
        (1.0, 1.0), description="range of width/height, drawn log-uniformly per image; (1, 1) keeps images square"
    )
    size_jitter: float = Field(
        0.0, ge=0, lt=1, description="per image, sqrt(width*height) is size times a factor drawn in [1-j, 1+j]"
    )

    @field_validator("classes", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        return tuple(c.strip() for c in value.split(",") if c.strip()) if isinstance(value, str) else value

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        if not classes:
            raise ValueError("classes must not be empty")
        unknown = [c for c in classes if c not in SHAPES]
        if unknown:
            raise ValueError(f"unknown classes {unknown}; choose from {sorted(SHAPES)}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes must be unique, got {list(classes)}")
        return classes

    @field_validator("aspect_ratios")
    @classmethod
    def _ordered_ratios(cls, ratios: tuple[float, float]) -> tuple[float, float]:
        lo, hi = ratios
        if not 0 < lo <= hi:
            raise ValueError(f"aspect_ratios must be (low, high) with 0 < low <= high, got ({lo}, {hi})")
        return ratios

    @model_validator(mode="after")
    def _objects_fit_and_val_split_exists(self) -> SynthSpec:
        if self.min_object > self.max_object:
            raise ValueError(f"min_object ({self.min_object}) must be <= max_object ({self.max_object})")
        if self.max_object > self.smallest_side:
            raise ValueError(
                f"max_object ({self.max_object}) must fit in the smallest image side, {self.smallest_side} px "
                f"with size {self.size}, size_jitter {self.size_jitter} and aspect_ratios {self.aspect_ratios}"
            )
        if self.val_fraction > 0 and self.num_val == 0:
            raise ValueError(
                f"val_fraction {self.val_fraction} of {self.images} images rounds to no val image; "
                "raise images or val_fraction, or set val_fraction 0 for no val split"
            )
        return self

    @property
    def num_val(self) -> int:
        return min(self.images - 1, round(self.images * self.val_fraction)) if self.images > 1 else 0

    @property
    def smallest_side(self) -> int:
        """The shortest image side any draw can give, px: objects up to max_object must fit in it."""
        lo, hi = self.aspect_ratios
        return math.floor(self.size * (1.0 - self.size_jitter) * min(math.sqrt(lo), 1.0 / math.sqrt(hi)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (lists for tuples): what the COCO ``info.spec`` records."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- drawing


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _contrasting_colour(rng: np.random.Generator, beneath: np.ndarray) -> tuple[int, int, int]:
    """A random colour whose luminance is at least MIN_CONTRAST away from ``beneath`` (0..1)."""
    lum = _luminance(beneath)
    sides = []
    if lum - MIN_CONTRAST >= 0.0:
        sides.append((0.0, lum - MIN_CONTRAST))
    if lum + MIN_CONTRAST <= 1.0:
        sides.append((lum + MIN_CONTRAST, 1.0))
    lo, hi = sides[int(rng.integers(len(sides)))]
    target = float(rng.uniform(lo, hi))
    hue = rng.uniform(0.0, 1.0, 3)
    chroma = hue - _luminance(hue)  # zero-luminance direction: keeps the target exact
    limits = [((1.0 - target) / d) if d > 1e-9 else (target / -d) if d < -1e-9 else math.inf for d in chroma]
    colour = target + min(1.0, *limits) * chroma
    r, g, b = (int(v) for v in np.rint(np.clip(colour * 255.0, 0, 255)))
    return r, g, b


def _axis(n: int, long_side: int) -> np.ndarray:
    """Pixel centres along an axis of n pixels, centred on 0, in units of the long side (isotropic gradients)."""
    return ((np.arange(n, dtype=np.float64) + 0.5) / n - 0.5) * (n / long_side)


def _background(rng: np.random.Generator, *, width: int, height: int, clutter: float) -> np.ndarray:
    """A smooth random background (height, width, 3) in [0, 1]: flat colour plus gradients."""
    base = rng.uniform(0.2, 0.8, 3)
    long_side = max(width, height)
    yy, xx = np.meshgrid(_axis(height, long_side), _axis(width, long_side), indexing="ij")
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = math.cos(angle) * xx + math.sin(angle) * yy  # in about [-0.7, 0.7]
    freq = rng.uniform(1.0, 3.0, 2) * 2.0 * math.pi * rng.choice([-1.0, 1.0], 2)
    wave = np.sin(freq[0] * xx + freq[1] * yy + rng.uniform(0.0, 2.0 * math.pi))
    amp = 0.6 * clutter
    field_ = ramp[..., None] * rng.uniform(-1.0, 1.0, 3) * amp + wave[..., None] * rng.uniform(-1.0, 1.0, 3) * amp * 0.3
    return np.clip(base + field_, 0.0, 1.0)


def _draw_distractors(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, *, width: int, height: int, clutter: float
) -> None:
    """Non-class clutter: line segments, irregular blobs and partial arcs, sized relative to the image."""
    ss = SUPERSAMPLE
    full = (width * ss, height * ss)
    extent = math.sqrt(width * height)  # the side of a square image of the same area
    for _ in range(int(rng.poisson(clutter * 8.0))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        width = int(rng.integers(1, 3)) * ss
        if kind == 0:  # line segment
            x0, y0 = rng.uniform(0, full)
            length = rng.uniform(0.1, 0.5) * extent * ss
            a = rng.uniform(0.0, 2.0 * math.pi)
            draw.line(
                [(x0, y0), (x0 + length * math.cos(a), y0 + length * math.sin(a))],
                fill=colour,
                width=width,
            )
        elif kind == 1:  # irregular blob: a random star-shaped polygon
            cx, cy = rng.uniform(0, full)
            radius = rng.uniform(1.5, 6.0) * ss
            n = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, n))
            radii = radius * rng.uniform(0.35, 1.0, n)
            draw.polygon(
                [(cx + r * math.cos(t), cy + r * math.sin(t)) for r, t in zip(radii, angles, strict=True)],
                fill=colour,
            )
        else:  # partial arc: never closed, so it is not a ring
            cx, cy = rng.uniform(0, full)
            r = rng.uniform(3.0, extent / 4) * ss
            start = float(rng.uniform(0.0, 360.0))
            draw.arc(
                (cx - r, cy - r, cx + r, cy + r),
                start=start,
                end=start + float(rng.uniform(40.0, 220.0)),
                fill=colour,
                width=width,
            )


def _iou(a: Box4, b: Box4) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _place_objects(rng: np.random.Generator, spec: SynthSpec, *, width: int, height: int) -> list[Box4]:
    """Square boxes (supersampled px) inside the image, log-uniform sizes, pairwise IoU <= spec.overlap."""
    ss = SUPERSAMPLE
    full_w, full_h = width * ss, height * ss
    lo = math.ceil(spec.min_object * ss)
    hi = math.floor(spec.max_object * ss)
    boxes: list[Box4] = []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        for _ in range(PLACEMENT_TRIES):
            side = math.exp(rng.uniform(math.log(spec.min_object), math.log(spec.max_object)))
            s = min(max(round(side * ss), lo), hi, full_w, full_h)
            x, y = (int(v) for v in rng.integers(0, (full_w - s + 1, full_h - s + 1)))
            box = (x, y, s, s)
            if all(_iou(box, other) <= spec.overlap for other in boxes):
                boxes.append(box)
                break
    return boxes


def image_size(spec: SynthSpec, index: int) -> tuple[int, int]:
    """(width, height) of image ``index``.

    Drawn from a stream of its own, so the square default draws nothing from
    the pixels' stream and writes exactly the images it always did.
    """
    rng = np.random.default_rng([spec.seed, index, 1])
    lo, hi = spec.aspect_ratios
    ratio = math.exp(rng.uniform(math.log(lo), math.log(hi)))  # width / height
    side = spec.size * rng.uniform(1.0 - spec.size_jitter, 1.0 + spec.size_jitter)  # sqrt(width * height)
    return max(1, round(side * math.sqrt(ratio))), max(1, round(side / math.sqrt(ratio)))


def render_image(spec: SynthSpec, index: int) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """Draw image ``index``: (H, W, 3) uint8 pixels and [(class index, [x, y, w, h])] boxes."""
    width, height = image_size(spec, index)
    rng = np.random.default_rng([spec.seed, index])
    ss = SUPERSAMPLE
    background = _background(rng, width=width, height=height, clutter=spec.clutter)
    big = np.repeat(np.repeat(np.round(background * 255.0).astype(np.uint8), ss, 0), ss, 1)
    canvas = Image.fromarray(big, "RGB")
    draw = ImageDraw.Draw(canvas)
    _draw_distractors(rng, draw, width=width, height=height, clutter=spec.clutter)

    placed = _place_objects(rng, spec, width=width, height=height)
    classes = [int(rng.integers(len(spec.classes))) for _ in placed]
    # Largest first: a small shape may sit on a big one but is never hidden by it.
    order = sorted(range(len(placed)), key=lambda i: -placed[i][2])
    objects: list[tuple[int, list[float]]] = []
    for i in order:
        x, y, s, _ = placed[i]
        beneath = np.asarray(canvas.crop((x, y, x + s, y + s))).reshape(-1, 3).mean(0) / 255.0
        colour = _contrasting_colour(rng, beneath)
        mask = Image.new("L", (s, s), 0)
        SHAPES[spec.classes[classes[i]]](ImageDraw.Draw(mask), s)
        canvas.paste(colour, (x, y, x + s, y + s), mask)
        objects.append((classes[i], [x / ss, y / ss, s / ss, s / ss]))

    pixels = np.asarray(canvas.reduce(ss), dtype=np.float64) / 255.0
    if spec.noise > 0:
        pixels = pixels + rng.normal(0.0, spec.noise, pixels.shape)
    image = np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image, objects


# --------------------------------------------------------------------------- writing


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_split(out_dir: Path, spec: SynthSpec, split: str, indices: range) -> dict[str, Any]:
    images_dir = out_dir / "images" / split
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir = out_dir / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in indices:
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        pixels, objects = render_image(spec, index)
        pil = Image.fromarray(pixels, "RGB")
        _write_atomic(images_dir / file_name, lambda p, im=pil: im.save(p, format="PNG"))
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for class_index, bbox in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_index + 1,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": "detkd synthetic shapes",
            "version": "1",
            "split": split,
            "spec": spec.to_dict(),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(spec.classes)],
    }
    ann_path = ann_dir / f"instances_{split}.json"
    text = json.dumps(coco, separators=(",", ":"))
    _write_atomic(ann_path, lambda p: p.write_text(text, encoding="utf-8"))
    return {
        "images": len(images),
        "annotations": len(annotations),
        "annotations_file": str(ann_path),
        "images_dir": str(images_dir),
    }


def synthesize(out_dir: Path, spec: SynthSpec) -> dict[str, Any]:
    """Write a synthetic COCO dataset under ``out_dir`` and return a summary.

    Layout: ``images/{train,val,test}/NNNNNN.png`` and
    ``annotations/instances_{train,val,test}.json`` (test only with ``test_images``).
    Image ids are global (train first, then val, then test); annotation ids count
    from 1 per split. Test images come after the others, so adding a test split
    leaves train and val exactly as they were. Each file is
    written to a temporary name and renamed, so a crash never leaves half a file.
    """
    out_dir = Path(out_dir)
    n_train = spec.images - spec.num_val
    splits = {
        "train": range(n_train),
        "val": range(n_train, spec.images),
        "test": range(spec.images, spec.images + spec.test_images),
    }
    summary: dict[str, Any] = {"path": str(out_dir), "spec": spec.to_dict()}
    for split in SPLITS:
        if split == "test" and not spec.test_images:
            continue
        summary[split] = _write_split(out_dir, spec, split, splits[split])
    summary["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(spec.classes)]
    return summary
