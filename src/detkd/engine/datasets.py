"""Datasets built from a run plan: the same views for training, the worker's evaluation and ``detkd evaluate``."""

from __future__ import annotations

from detkd.data.dataset import DetectionDataset
from detkd.data.records import DetectionSource
from detkd.data.transforms import Compose, RandomHorizontalFlip, ResizeShortSide, ScaleBy, eval_transform
from detkd.engine.plan import open_split
from detkd.records import InputSpec, RunPlan


def train_transform(plan: RunPlan) -> Compose:
    """Reference view + flip; plain students are scaled here, distilled ones by the distiller
    (so every teacher and the student see exactly aligned views of one augmented batch)."""
    spec = plan.input
    steps = [ResizeShortSide(spec.size, spec.max_size)]
    if plan.config.input.hflip > 0:
        steps.append(RandomHorizontalFlip(plan.config.input.hflip))
    if spec.scale != 1.0 and not plan.distilling:
        steps.append(ScaleBy(spec.scale))
    return Compose(steps)


def eval_dataset(source: DetectionSource, spec: InputSpec) -> DetectionDataset:
    return DetectionDataset(source, transform=eval_transform(spec), train=False)


def build_dataset(plan: RunPlan, split: str, *, train: bool) -> DetectionDataset:
    section = getattr(plan.config.data, split)
    if section is None:
        raise ValueError(f"config has no data.{split} split")
    source = open_split(section, skip_invalid=plan.config.data.skip_invalid)
    if train:
        return DetectionDataset(source, transform=train_transform(plan), train=True)
    return eval_dataset(source, plan.input)
