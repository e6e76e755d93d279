"""``detkd data preview``: the training views of a run config, drawn with their boxes.

For the first N training samples, one augmented reference view each (``input.augment``, seeded), and
from it the two views training derives: the teacher's (reference x the first teacher's input scale)
and this model's, the "student" (reference x ``input.scale``: what the distiller gives a distilled
student, what the training transform gives a plain one). Needs the data, not the teachers: a
teacher's scale comes from ``distill.teachers[0].input_scale`` or a local checkpoint, else 1.
No Ray, no MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from detkd.config import Config, ConfigError
from detkd.data.augment import reference_transform
from detkd.data.dataset import DetectionDataset
from detkd.data.records import DetectionSource
from detkd.data.transforms import Target, sanitize_boxes, scale_by
from detkd.engine.plan import open_split, resolve_augment, stage_configs
from detkd.engine.rng import seed_everything

__all__ = ["preview_views", "teacher_view_scale", "write_preview"]

logger = logging.getLogger(__name__)

# distinct outline colours, one per label (cycled)
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)  # fmt: skip


def teacher_view_scale(cfg: Config) -> float:
    """The first teacher's input relative to the reference view, without resolving the teacher when possible:
    ``input_scale`` if set, an MMDetection teacher 1, a local detkd checkpoint its recorded input size, else 1."""
    if cfg.distill is None or not cfg.distill.teachers:
        return 1.0
    ref = cfg.distill.teachers[0]
    if ref.input_scale is not None:
        return float(ref.input_scale)
    if ref.mmdet_config is not None or ref.source is None or Path(ref.source).is_dir():
        return 1.0  # an MMDetection, transformers or backbone teacher sees the reference view unless told
    path = Path(ref.source).expanduser()
    if path.is_file():
        from detkd.engine.teachers import teacher_scale
        from detkd.models.checkpoint import CheckpointError, read_checkpoint_meta

        try:
            meta = read_checkpoint_meta(path)
            return teacher_scale(ref, meta, cfg, meta.num_classes, path=path, where="distill.teachers[0]")
        except (CheckpointError, ConfigError) as exc:
            logger.warning("distill.teachers[0]: %s; the teacher view is drawn at the reference view's scale", exc)
            return 1.0
    logger.warning(
        "distill.teachers[0] %r is not a local checkpoint and sets no input_scale: "
        "the teacher view is drawn at the reference view's scale (1)",
        ref.source,
    )
    return 1.0


def preview_views(
    cfg: Config, source: DetectionSource, *, images: int, seed: int
) -> list[tuple[int, tuple[torch.Tensor, Target], tuple[torch.Tensor, Target]]]:
    """(sample index, teacher view, student view) for the first ``images`` samples; ``cfg`` as a plan holds it
    (``resolve_augment`` applied). Each sample is augmented once; both views are derived from that one view."""
    distilling = cfg.distill is not None and bool(cfg.distill.teachers)
    teacher_scale = teacher_view_scale(cfg)
    student_scale = cfg.input.scale
    raw = DetectionDataset(source, transform=None, train=False)  # decoded, crowd boxes already left out
    augment = reference_transform(cfg.input)
    seed_everything(seed)
    out = []
    for k in range(min(images, len(raw))):
        image, target = augment(*raw[k])
        height, width = image.shape[-2:]
        reference = (image, sanitize_boxes(target, height=height, width=width))  # what the dataset yields
        teacher = reference if teacher_scale == 1.0 else scale_by(*reference, factor=teacher_scale)
        if student_scale == 1.0:
            student = reference
        elif distilling:  # the distiller scales the dataset's (sanitized) reference batch
            student = scale_by(*reference, factor=student_scale)
        else:  # a plain model's training transform scales, then the dataset sanitizes
            small, small_target = scale_by(image, target, factor=student_scale)
            student = (small, sanitize_boxes(small_target, height=small.shape[-2], width=small.shape[-1]))
        out.append((k, teacher, student))
    return out


def _draw(image: torch.Tensor, target: Target, names: dict[int, str]) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    picture = Image.fromarray(array, "RGB")
    draw = ImageDraw.Draw(picture)
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
        colour = PALETTE[int(label) % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=1)
        draw.text((box[0] + 1, box[1] + 1), names.get(int(label), str(label)), fill=colour)
    return picture


def _view_record(image: torch.Tensor, target: Target, names: dict[int, str], scale: float) -> dict[str, Any]:
    labels = [int(v) for v in target["labels"].tolist()]
    return {
        "size": [int(image.shape[-2]), int(image.shape[-1])],
        "scale": scale,
        "boxes": [[round(float(v), 3) for v in box] for box in target["boxes"].tolist()],
        "labels": labels,
        "names": [names.get(label, str(label)) for label in labels],
    }


def _check_out(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: the folder is not empty; pass --overwrite to replace it")


def write_preview(
    cfg: Config, *, out: Path, images: int, seed: int | None = None, overwrite: bool = False
) -> list[dict[str, Any]]:
    """Write ``<k>_teacher.png``, ``<k>_student.png`` and ``boxes.json`` into ``out``; return boxes.json's list.

    The files are written into a new folder next to ``out`` that then replaces it, so ``out`` holds a
    whole preview or is left as it was. A non-empty ``out`` is refused unless ``overwrite``. A
    progressive config previews its first stage.
    """
    out = Path(out)
    _check_out(out, overwrite=overwrite)
    if images < 1:
        raise ConfigError(f"--images must be at least 1, got {images}")
    if cfg.distill is not None and cfg.distill.stages:
        logger.info("%s: distill.stages: previewing the first stage", cfg.name)
        cfg = stage_configs(cfg)[0]
    cfg = resolve_augment(cfg)
    if cfg.data.train is None:
        raise ConfigError(f"{cfg.name}: data.train: the config has no training split")
    source = open_split(cfg.data.train, skip_invalid=cfg.data.skip_invalid)
    names = {source.label_of(c.id): c.name for c in source.categories}
    teacher_scale = teacher_view_scale(cfg)
    views = preview_views(cfg, source, images=images, seed=cfg.seed if seed is None else seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        entries = []
        for k, (t_image, t_target), (s_image, s_target) in views:
            _draw(t_image, t_target, names).save(staging / f"{k}_teacher.png")
            _draw(s_image, s_target, names).save(staging / f"{k}_student.png")
            record = source.records[k]
            entries.append(
                {
                    "sample": k,
                    "image_id": int(record.image_id),
                    "file_name": record.file_name,
                    "teacher": _view_record(t_image, t_target, names, teacher_scale),
                    "student": _view_record(s_image, s_target, names, cfg.input.scale),
                }
            )
        (staging / "boxes.json").write_text(json.dumps(entries, indent=1) + "\n")
        _replace(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return entries


def _replace(out: Path, staging: Path) -> None:
    """Move the finished ``staging`` folder to ``out``; an existing ``out`` goes only once it is in place."""
    os.chmod(staging, 0o755)  # mkdtemp makes it private
    if not out.exists():
        staging.rename(out)
        return
    old = staging.with_name(staging.name + ".old")
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
