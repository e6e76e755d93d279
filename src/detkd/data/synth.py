"""Synthetic shape detection datasets, written as COCO.

Tests, quickstarts and benchmarks need a detection dataset that exists offline,
builds in seconds and is hard in the right way: classes differ by SHAPE only
(colours are random and chosen to contrast with what lies beneath), sizes are
log-uniform so small objects are common, and clutter (line segments, irregular
blobs, partial arcs, a smooth background) gives false-positive bait. At half
resolution the small shapes become genuinely ambiguous, which is the regime
low-resolution distillation is about.

Every image is drawn from its own generator seeded by ``(seed, index)``, so the
output does not depend on the order or the number of images drawn before it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "SynthSpec", "render_image", "synthesize"]

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
MIN_CONTRAST = 0.35  # luminance gap between an object and what lies beneath it
PLACEMENT_TRIES = 30
SPLITS = ("train", "val")

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


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. Sizes are in output pixels; the defaults make a small benchmark."""

    images: int = 400
    size: int = 128  # square images of size x size
    seed: int = 0
    val_fraction: float = 0.2
    classes: tuple[str, ...] = field(default=("square", "circle", "triangle"))
    min_object: float = 4  # px, side of the tight box
    max_object: float = 48  # px
    max_objects: int = 6  # per image (at least 1 is always drawn)
    clutter: float = 0.5  # 0..1: distractor count and background gradient strength
    noise: float = 0.03  # gaussian pixel noise sigma on the 0..1 scale
    overlap: float = 0.3  # max IoU between two objects

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        errors = []
        if self.images < 1:
            errors.append(f"images must be >= 1, got {self.images}")
        if self.size < 8:
            errors.append(f"size must be >= 8, got {self.size}")
        if self.seed < 0:
            errors.append(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.val_fraction < 1.0:
            errors.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.classes:
            errors.append("classes must not be empty")
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            errors.append(f"unknown classes {unknown}; choose from {sorted(SHAPES)}")
        if len(set(self.classes)) != len(self.classes):
            errors.append(f"classes must be unique, got {list(self.classes)}")
        if not 1 <= self.min_object <= self.max_object <= self.size:
            errors.append(
                f"need 1 <= min_object <= max_object <= size, got {self.min_object}, {self.max_object}, {self.size}"
            )
        if self.max_objects < 1:
            errors.append(f"max_objects must be >= 1, got {self.max_objects}")
        if not 0.0 <= self.clutter <= 1.0:
            errors.append(f"clutter must be in [0, 1], got {self.clutter}")
        if self.noise < 0.0:
            errors.append(f"noise must be >= 0, got {self.noise}")
        if not 0.0 <= self.overlap <= 1.0:
            errors.append(f"overlap must be in [0, 1], got {self.overlap}")
        if errors:
            raise ValueError("invalid SynthSpec: " + "; ".join(errors))

    @property
    def num_val(self) -> int:
        return min(self.images - 1, round(self.images * self.val_fraction)) if self.images > 1 else 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        return data


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


def _background(rng: np.random.Generator, size: int, clutter: float) -> np.ndarray:
    """A smooth random background (size, size, 3) in [0, 1]: flat colour plus gradients."""
    base = rng.uniform(0.2, 0.8, 3)
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = math.cos(angle) * xx + math.sin(angle) * yy  # in about [-0.7, 0.7]
    freq = rng.uniform(1.0, 3.0, 2) * 2.0 * math.pi * rng.choice([-1.0, 1.0], 2)
    wave = np.sin(freq[0] * xx + freq[1] * yy + rng.uniform(0.0, 2.0 * math.pi))
    amp = 0.6 * clutter
    field_ = ramp[..., None] * rng.uniform(-1.0, 1.0, 3) * amp + wave[..., None] * rng.uniform(-1.0, 1.0, 3) * amp * 0.3
    return np.clip(base + field_, 0.0, 1.0)


def _draw_distractors(rng: np.random.Generator, draw: ImageDraw.ImageDraw, *, size: int, clutter: float) -> None:
    """Non-class clutter: line segments, irregular blobs and partial arcs."""
    ss = SUPERSAMPLE
    full = size * ss
    for _ in range(int(rng.poisson(clutter * 8.0))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        width = int(rng.integers(1, 3)) * ss
        if kind == 0:  # line segment
            x0, y0 = rng.uniform(0, full, 2)
            length = rng.uniform(0.1, 0.5) * full
            a = rng.uniform(0.0, 2.0 * math.pi)
            draw.line(
                [(x0, y0), (x0 + length * math.cos(a), y0 + length * math.sin(a))],
                fill=colour,
                width=width,
            )
        elif kind == 1:  # irregular blob: a random star-shaped polygon
            cx, cy = rng.uniform(0, full, 2)
            radius = rng.uniform(1.5, 6.0) * ss
            n = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, n))
            radii = radius * rng.uniform(0.35, 1.0, n)
            draw.polygon(
                [(cx + r * math.cos(t), cy + r * math.sin(t)) for r, t in zip(radii, angles, strict=True)],
                fill=colour,
            )
        else:  # partial arc: never closed, so it is not a ring
            cx, cy = rng.uniform(0, full, 2)
            r = rng.uniform(3.0, size / 4) * ss
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


def _place_objects(rng: np.random.Generator, spec: SynthSpec) -> list[Box4]:
    """Square boxes (supersampled px), log-uniform sizes, pairwise IoU <= spec.overlap."""
    ss = SUPERSAMPLE
    full = spec.size * ss
    lo = math.ceil(spec.min_object * ss)
    hi = math.floor(spec.max_object * ss)
    boxes: list[Box4] = []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        for _ in range(PLACEMENT_TRIES):
            side = math.exp(rng.uniform(math.log(spec.min_object), math.log(spec.max_object)))
            s = min(max(round(side * ss), lo), hi, full)
            x, y = (int(v) for v in rng.integers(0, full - s + 1, 2))
            box = (x, y, s, s)
            if all(_iou(box, other) <= spec.overlap for other in boxes):
                boxes.append(box)
                break
    return boxes


def render_image(spec: SynthSpec, index: int) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """Draw image ``index``: (H, W, 3) uint8 pixels and [(class index, [x, y, w, h])] boxes."""
    rng = np.random.default_rng([spec.seed, index])
    ss = SUPERSAMPLE
    background = _background(rng, spec.size, spec.clutter)
    big = np.repeat(np.repeat(np.round(background * 255.0).astype(np.uint8), ss, 0), ss, 1)
    canvas = Image.fromarray(big, "RGB")
    draw = ImageDraw.Draw(canvas)
    _draw_distractors(rng, draw, size=spec.size, clutter=spec.clutter)

    placed = _place_objects(rng, spec)
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
        images.append({"id": image_id, "file_name": file_name, "width": spec.size, "height": spec.size})
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

    Layout: ``images/{train,val}/NNNNNN.png`` and
    ``annotations/instances_{train,val}.json``. Image ids are global (train
    first, then val); annotation ids count from 1 per split. Each file is
    written to a temporary name and renamed, so a crash never leaves half a file.
    """
    out_dir = Path(out_dir)
    n_train = spec.images - spec.num_val
    splits = {"train": range(n_train), "val": range(n_train, spec.images)}
    summary: dict[str, Any] = {"path": str(out_dir), "spec": spec.to_dict()}
    for split in SPLITS:
        summary[split] = _write_split(out_dir, spec, split, splits[split])
    summary["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(spec.classes)]
    return summary
