"""Datasets and loaders built from a run config (the same transforms for every entry point)."""

from __future__ import annotations

from detkd.config import Config, SplitConfig
from detkd.data import open_source
from detkd.data.dataset import DetectionDataset
from detkd.data.records import DetectionSource
from detkd.data.transforms import Compose, RandomHorizontalFlip, ResizeShortSide, ScaleBy


def open_split(split: SplitConfig, *, skip_invalid: bool) -> DetectionSource:
    return open_source(coco=split.coco, images=split.images, parquet=split.parquet, skip_invalid=skip_invalid)


def distilling(cfg: Config) -> bool:
    return cfg.distill is not None and bool(cfg.distill.teachers)


def train_transform(cfg: Config) -> Compose:
    """Reference view + flip; plain students are scaled here, distilled ones by the distiller
    (so every teacher and the student see exactly aligned views of one augmented batch)."""
    steps = [ResizeShortSide(cfg.input.size, cfg.input.max_size)]
    if cfg.input.hflip > 0:
        steps.append(RandomHorizontalFlip(cfg.input.hflip))
    if cfg.input.scale != 1.0 and not distilling(cfg):
        steps.append(ScaleBy(cfg.input.scale))
    return Compose(steps)


def eval_transform(cfg: Config) -> Compose:
    steps = [ResizeShortSide(cfg.input.size, cfg.input.max_size)]
    if cfg.input.scale != 1.0:
        steps.append(ScaleBy(cfg.input.scale))
    return Compose(steps)


def build_dataset(cfg: Config, split: str, *, train: bool) -> DetectionDataset:
    section = getattr(cfg.data, split)
    if section is None:
        raise ValueError(f"config has no data.{split} split")
    source = open_split(section, skip_invalid=cfg.data.skip_invalid)
    return DetectionDataset(source, transform=train_transform(cfg) if train else eval_transform(cfg), train=train)
