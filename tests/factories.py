"""Shared builders for tests: tiny FCOS detectors, random image batches and feature pyramids, tiny pipeline
specs, one detection dataset written as COCO, YOLO and Pascal VOC. Plain functions
(``from factories import tiny_fcos``); tests/ is on sys.path through tests/conftest.py.
Fixtures that start things (datasets, Ray, servers) stay in conftest.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

# The columns of a `--summary` JSON row (detkd train/distill/run)
SUMMARY_COLUMNS = frozenset(
    {"name", "role", "method", "input_size", "split", "AP", "AP50", "APs", "images_per_s", "mlflow_run_id"}
)


def tiny_fcos(
    fpn_channels: int = 32, *, min_level: int = 3, max_level: int = 6, num_classes: int = 3, seed: int = 0, **kw
):
    """A torchvision FCOS on the ``tiny`` backbone, its weights drawn after ``torch.manual_seed(seed)``."""
    from detkd.models import build_detector

    torch.manual_seed(seed)
    return build_detector(
        arch="fcos",
        backbone="tiny",
        num_classes=num_classes,
        min_level=min_level,
        max_level=max_level,
        fpn_channels=fpn_channels,
        **kw,
    )


def tracking_in(folder: Path):
    """The tracking context of an SQLite MLflow store in ``folder``: a test's own folder, so that a plan that
    does open its store never writes into the working directory."""
    from detkd.records import TrackingContext

    return TrackingContext(uri=f"sqlite:///{folder / 'mlflow.db'}", experiment="detkd")


def untrained_checkpoint(config: dict, path: Path, *, seed: int = 0, tracking_uri: str | None = None) -> Path:
    """An untrained detector of run config ``config`` saved with its run plan at ``path``: a checkpoint
    that loads, exports and runs like a trained one (no training)."""
    from detkd.config import validate_config
    from detkd.engine.build import resolved_model
    from detkd.engine.plan import build_plan
    from detkd.models import build_model, save_detector
    from detkd.records import TrackingContext

    cfg = validate_config(config, source="test")
    uri = tracking_uri or f"sqlite:///{path.parent / 'mlflow.db'}"
    plan = build_plan(cfg, tracking=TrackingContext(uri=uri, experiment="detkd"))
    torch.manual_seed(seed)
    model = build_model(resolved_model(cfg), num_classes=plan.num_classes)
    save_detector(path, model, meta={"plan": plan.to_dict()})
    return path


def registrable_model(config: dict, path: Path, *, tracking_uri: str, seed: int = 0) -> tuple[str, str]:
    """:func:`untrained_checkpoint` at ``path``, a FINISHED MLflow run (experiment ``detkd``) it belongs to,
    and its logged pyfunc: (run id, model URI). What registering needs, without training."""
    from mlflow.tracking import MlflowClient

    from detkd.tracking.registry import logged_model_uri
    from detkd.tracking.runs import experiment_id

    untrained_checkpoint(config, path, seed=seed, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(experiment_id(tracking_uri, "detkd"), run_name=path.parent.name).info.run_id
    client.set_terminated(run_id)
    return run_id, logged_model_uri(tracking_uri, run_id, checkpoint=path, example_size=64)


Boxes = Sequence[Sequence[float]]


def random_batch(
    targets: Sequence[tuple[Boxes, Sequence[int]]],
    *,
    size: int = 128,
    sizes: Sequence[tuple[int, int]] | None = None,
    seed: int | None = 0,
    generator: bool = False,
    scale: float = 1.0,
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(images, targets): one uniform random 3-channel image per target (``size`` square, or ``sizes`` (h, w)),
    each target ``(boxes, labels)`` in pixels (times ``scale``).

    The images come from ``torch.manual_seed(seed)`` and the global generator, or with ``generator=True``
    from a private ``torch.Generator`` seeded with ``seed``; ``seed=None`` draws from the global state as is."""
    shapes = list(sizes) if sizes is not None else [(size, size)] * len(targets)
    assert len(shapes) == len(targets)
    gen = None
    if generator:
        gen = torch.Generator().manual_seed(seed or 0)
    elif seed is not None:
        torch.manual_seed(seed)
    images = [torch.rand(3, h, w, generator=gen) for h, w in shapes]
    made = []
    for boxes, labels in targets:
        box = torch.tensor([list(map(float, b)) for b in boxes])
        made.append({"boxes": box * scale if scale != 1.0 else box, "labels": torch.tensor(list(labels))})
    return images, made


def random_pyramid(
    shapes: dict[str, tuple[int, ...]],
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    offset: float = 0.0,
    requires_grad: bool = False,
) -> dict[str, torch.Tensor]:
    """Normal random features per level (``{"p3": (n, c, h, w), ...}``), from ``generator`` or a new one seeded
    with ``seed``; ``offset`` is added, and the tensors are leaves that require grad when asked."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed or 0)
    pyramid = {}
    for level, shape in shapes.items():
        features = torch.randn(*shape, generator=gen)
        if offset:
            features = features + offset
        pyramid[level] = features.requires_grad_(requires_grad) if requires_grad else features
    return pyramid


TINY_PIPELINE_DEFAULTS: dict[str, Any] = {
    "model": {"arch": "fcos", "backbone": "tiny", "fpn_channels": 32, "head_convs": 1},
    "input": {"size": 64},
    "train": {"epochs": 1, "batch_size": 8},
    "tracking": {"log_model": False},
}


def tiny_pipeline_spec(
    name: str,
    work: Path,
    uri: str,
    *,
    teachers: list,
    students: Iterable = (),
    synth: dict | None = None,
    experiment: str | None = None,
) -> dict:
    """A pipeline spec of tiny 64 px FCOS models that train for one epoch on synthetic shapes."""
    return {
        "name": name,
        "workdir": str(work),
        "tracking": {"experiment": experiment or name, "tracking_uri": uri},
        "data": {"synth": {"size": 64, "seed": 3, "min_object": 10, "max_object": 32, **(synth or {})}},
        "defaults": {key: dict(value) for key, value in TINY_PIPELINE_DEFAULTS.items()},
        "teachers": teachers,
        "students": list(students),
    }


def write_yaml(path: Path, data: dict, **dump) -> Path:
    path.write_text(yaml.safe_dump(data, **dump))
    return path


# --------------------------------------------------------------------------- one dataset in three formats

# YOLO stores boxes normalised, as text: written with 6 decimals (as Ultralytics' tools do), a value is off by up
# to 5e-7 of the image side, so a corner (centre -/+ half the size) by up to 1e-6 of it: 1e-4 px for the 100 px
# images here, 5e-4 px at 512 px. float32 boxes add ~1e-5 px. Boxes read from YOLO agree within this.
YOLO_TOLERANCE_PX = 1e-3


@dataclass
class FormatImage:
    """One image written in every format: boxes as integer 0-based pixel xyxy with their class names.

    ``difficult`` boxes are COCO crowd regions and VOC difficult objects; YOLO has no such
    notion and leaves them out. ``pixels`` (H, W, 3 uint8) default to seeded noise.
    """

    file_name: str
    width: int
    height: int
    boxes: Sequence[tuple[int, int, int, int]] = ()
    names: Sequence[str] = ()
    difficult: Sequence[bool] | None = None
    pixels: np.ndarray | None = None

    def crowd(self) -> list[bool]:
        return list(self.difficult) if self.difficult is not None else [False] * len(self.boxes)


@dataclass
class FormatPaths:
    """Where :func:`write_all_formats` put each format, and the class names in id order."""

    coco: Path
    coco_images: Path
    yolo: Path  # the data.yaml
    voc: Path
    classes: list[str]


def write_image(
    path: Path, width: int, height: int, *, seed: int = 0, pixels: np.ndarray | None = None, orientation: int = 1
) -> Path:
    """An RGB image file (format from the suffix): seeded noise unless ``pixels`` (H, W, 3 uint8) are given,
    with an EXIF orientation tag unless it is 1 (upright)."""
    if pixels is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, exif=exif)
    else:
        image.save(path)
    return path


def write_all_formats(root: Path, images: Sequence[FormatImage], classes: Sequence[str], *, split: str = "train"):
    """Write one split as ``root/coco`` (category id = class index), ``root/yolo`` and ``root/voc``, by hand.

    Written from the format descriptions, not with detkd's writers, so the readers are checked against
    the formats themselves: VOC boxes 1-based inclusive (``xmin = x1 + 1, xmax = x2``), YOLO normalised
    ``cx cy w h`` with 6 decimals and no label file for an image without objects.
    """
    root = Path(root)
    class_id = {name: i for i, name in enumerate(classes)}
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": i, "name": name} for i, name in enumerate(classes)]
    voc_ids = []
    for seed, image in enumerate(images):
        for folder in (root / "coco/images", root / f"yolo/images/{split}", root / "voc/JPEGImages"):
            write_image(folder / image.file_name, image.width, image.height, seed=seed, pixels=image.pixels)
        image_id = seed + 1
        coco["images"].append(
            {"id": image_id, "file_name": image.file_name, "width": image.width, "height": image.height}
        )
        lines, objects = [], []
        for (x1, y1, x2, y2), name, crowd in zip(image.boxes, image.names, image.crowd(), strict=True):
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": class_id[name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(crowd),
                }
            )
            if not crowd:
                cx, cy = (x1 + x2) / 2 / image.width, (y1 + y2) / 2 / image.height
                w, h = (x2 - x1) / image.width, (y2 - y1) / image.height
                lines.append(f"{class_id[name]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            objects.append(
                f"<object><name>{name}</name><difficult>{int(crowd)}</difficult><bndbox>"
                f"<xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            )
        stem = Path(image.file_name).with_suffix("").as_posix()
        if lines:
            label = root / f"yolo/labels/{split}/{stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("\n".join(lines) + "\n")
        xml = root / f"voc/Annotations/{stem}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(
            f"<annotation><filename>{image.file_name}</filename><size><width>{image.width}</width>"
            f"<height>{image.height}</height><depth>3</depth></size>{''.join(objects)}</annotation>\n"
        )
        voc_ids.append(stem)
    (root / "coco/annotations.json").write_text(json.dumps(coco))
    write_yaml(root / "yolo/data.yaml", {split: f"images/{split}", "names": list(classes)})
    split_file = root / f"voc/ImageSets/Main/{split}.txt"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text("".join(f"{i}\n" for i in voc_ids))
    return FormatPaths(
        coco=root / "coco/annotations.json",
        coco_images=root / "coco/images",
        yolo=root / "yolo/data.yaml",
        voc=root / "voc",
        classes=list(classes),
    )


# A small set: several boxes and classes, a difficult (crowd) box, an image without objects, a nested file name
FORMAT_CLASSES = ["cat", "dog", "bird"]
FORMAT_IMAGES = [
    FormatImage("a.png", 64, 48, [(10, 10, 30, 25), (0, 0, 64, 48)], ["cat", "dog"]),
    FormatImage("b.png", 80, 60, [(5, 5, 15, 15), (20, 30, 70, 58)], ["bird", "cat"], difficult=[False, True]),
    FormatImage("c.png", 50, 50),
    FormatImage("sub/d.png", 100, 70, [(30, 20, 70, 50), (1, 2, 3, 4)], ["bird", "dog"]),
]


def require_hf() -> None:
    """Skip the calling test module without the ``hf`` extra, unless ``DETKD_REQUIRE_HF=1`` (CI sets it), which
    makes a missing extra a failure rather than a suite that silently ran nothing."""
    import pytest

    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        if os.environ.get("DETKD_REQUIRE_HF") == "1":
            raise RuntimeError(f"DETKD_REQUIRE_HF=1 but the hf extra is missing: {exc}") from None
        pytest.skip("the hf extra: pip install -c constraints.txt -e '.[hf]'", allow_module_level=True)
