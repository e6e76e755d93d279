"""Datasets built from a run plan: the same views for training, the worker's evaluation and ``detkd evaluate``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from detkd.config import Config
from detkd.data.augment import reference_transform
from detkd.data.dataset import DetectionDataset
from detkd.data.records import DatasetError, DetectionSource, Problem
from detkd.data.transforms import Compose, ScaleBy, eval_transform
from detkd.engine.plan import open_split
from detkd.records import InputSpec, RunPlan

log = logging.getLogger("detkd.train")


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


@dataclass(frozen=True)
class Unreadable:
    """Stands in a batch for an image that could not be read (see :class:`TrainingImages`)."""

    problem: Problem


class TrainingImages(Dataset):
    """The training split as the loader reads it, for images that fail only when training reads them.

    Validation reads image headers, so a file cut short after its header passes it and fails to decode
    mid-training. With ``skip_invalid`` (``data.skip_invalid``, ``--skip-invalid``) the next readable image
    takes its place in the batch, with one warning per file: every worker keeps its batch size and takes
    the planned steps. Without, the sample is an :class:`Unreadable` marker that :func:`readable_batch`
    raises as a DatasetError in the training process (a loader subprocess's own exception would arrive
    re-typed, its traceback in its message), and the run stops without retries (engine/stops.py)."""

    def __init__(self, dataset: DetectionDataset, *, skip_invalid: bool) -> None:
        self.dataset, self.skip_invalid = dataset, skip_invalid
        self.reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        for offset in range(len(self)):
            at = (index + offset) % len(self)
            try:
                return self.dataset[at]
            except DatasetError as exc:
                problem = self.located(exc.problems[0], at)
                if not self.skip_invalid:
                    return Unreadable(problem), {}
                if problem.file not in self.reported:
                    self.reported.add(problem.file)
                    log.warning(f"skipping an unreadable training image (data.skip_invalid): {problem}")
        raise DatasetError([Problem(self.dataset.source.origin, "-", "no training image can be read")])

    def located(self, problem: Problem, index: int) -> Problem:
        """The problem naming the image file itself when the source reads files from a folder."""
        source = self.dataset.source
        root = getattr(source.image_reader, "root", None)
        if root is None or problem.file != source.origin:
            return problem
        return Problem(str(Path(root) / source.records[index].file_name), problem.record, problem.message)


def readable_batch(images: list[Any], targets: list[Any]) -> tuple[list[Any], list[Any]]:
    """A batch as the loader gave it; a DatasetError naming the image when :class:`TrainingImages` met one
    it could not read (and ``data.skip_invalid`` is off)."""
    bad = [image.problem for image in images if isinstance(image, Unreadable)]
    if bad:
        problems = [
            Problem(
                p.file,
                p.record,
                f"{p.message} (met during training: fix or remove the file and run the same command again to "
                "resume from the last checkpoint, or skip unreadable images with --skip-invalid / "
                "data.skip_invalid: true)",
            )
            for p in bad
        ]
        raise DatasetError(problems)
    return images, targets
