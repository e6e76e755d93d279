"""Datasets built from a run plan: the same views for training, the worker's evaluation and ``detkd evaluate``."""

from __future__ import annotations

from detkd.config import Config
from detkd.data.augment import reference_transform
from detkd.data.dataset import DetectionDataset
from detkd.data.records import DetectionSource
from detkd.data.transforms import Compose, ScaleBy, eval_transform
from detkd.engine.plan import open_split
from detkd.records import InputSpec, RunPlan


def training_transform(cfg: Config, *, distilling: bool) -> Compose:
    """The augmented reference view (``input.augment``); plain students are scaled here, distilled ones by
    the distiller (so every teacher and the student see exactly aligned views of one augmented batch).

    ``cfg`` is a plan's config: ``engine.plan.resolve_augment`` has filled in the multi-scale teacher's jitter.
    """
    steps = list(reference_transform(cfg.input).transforms)
    if cfg.input.scale != 1.0 and not distilling:
        steps.append(ScaleBy(cfg.input.scale))
    return Compose(steps)


def train_transform(plan: RunPlan) -> Compose:
    return training_transform(plan.config, distilling=plan.distilling)


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
