"""Shared builders for tests: tiny FCOS detectors, random image batches and feature pyramids, tiny pipeline
specs. Plain functions (``from factories import tiny_fcos``); tests/ is on sys.path through tests/conftest.py.
Fixtures that start things (datasets, Ray, servers) stay in conftest.py."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

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
