"""The distiller: one trainable student, frozen teachers, named distillation terms.

Like timm's distillation task, teachers are kept OUT of the module tree: they are
never in ``distiller.parameters()``, the optimizer or a DDP wrapper, and
``distiller.train()`` never switches them out of eval mode. Each teacher runs once
per batch without gradients on its own view of the same augmented batch.

Every loss gets student/teacher pyramids already paired by level (``pair_levels``:
pyramid shift for 2**k resolution ratios, nearest footprint otherwise) and aligned on
the student's grid (``align.align_level``: each sample's valid, unpadded teacher cells
resampled to the same image positions), plus ``masks``: level -> (N, 1, H, W) bool mask
of the student's valid cells, for the levels where the padded batch has padding. When
nothing is padded and the geometry matches (the usual fixed-size 2**k case) the teacher
maps pass through untouched and no mask is made.

``forward(images, targets)`` returns a loss dict exactly like a torchvision
detector in training mode, so the same training loop runs both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detkd.config import DistillConfig
from detkd.data.transforms import scale_batch
from detkd.distill.align import LevelGrid, align_level, level_grids, valid_mask
from detkd.distill.base import DistillLoss
from detkd.distill.cosine import FeatureCosineLoss
from detkd.distill.dsamkd import DSAMKDLoss
from detkd.distill.functional import pair_levels, pair_nearest
from detkd.distill.mgd import MGDLoss
from detkd.distill.msad import MSADLoss
from detkd.distill.mse import FeatureMSELoss
from detkd.distill.ssim import SSIMFeatureLoss
from detkd.models.detectors import pyramid_strides
from detkd.models.hf_detector import HFDetector
from detkd.models.mmdet_detector import MMDetDetector
from detkd.models.multiscale import MultiScaleDetector
from detkd.models.taps import DetectorTaps, extract_features, foreground_logits, has_dense_logits, logit_layout
from detkd.models.vit_teacher import ViTFeatureTeacher

__all__ = ["LOSSES", "Distiller", "Teacher", "channels_of", "freeze"]

# One name -> loss class table for this family (the only string lookup).
LOSSES: dict[str, type[DistillLoss]] = {
    "mse": FeatureMSELoss,
    "cosine": FeatureCosineLoss,
    "ssim": SSIMFeatureLoss,
    "mgd": MGDLoss,
    "msad": MSADLoss,
    "dsamkd": DSAMKDLoss,
}


@dataclass(frozen=True)
class Teacher:
    """A frozen teacher and the scale of its input relative to the reference view."""

    model: nn.Module
    scale: float


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def channels_of(model: nn.Module) -> int:
    """FPN channels of a detector (of a multi-scale teacher's shared detector, of an MMDetection neck, of a
    transformer detector's encoder)."""
    inner = model.detector if isinstance(model, MultiScaleDetector) else model
    if isinstance(inner, (MMDetDetector, HFDetector, ViTFeatureTeacher)):
        return inner.out_channels
    return int(inner.backbone.out_channels)


def loss_class(name: str) -> type[DistillLoss]:
    if name not in LOSSES:
        raise ValueError(f"unknown distillation method {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name]


@dataclass(frozen=True)
class _View:
    """One model's features on its own view of the batch and where the image content lies per level."""

    pyramid: Mapping[str, Tensor]
    logits: Mapping[str, Tensor] | None
    grids: Mapping[str, LevelGrid]


def _image_sizes(images: Sequence[Tensor]) -> list[tuple[int, int]]:
    return [(int(image.shape[-2]), int(image.shape[-1])) for image in images]


def _as_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()  # a bf16 (GPU autocast) teacher output


class _AlignedTeachers:
    """Teacher maps put on the student's grid (``align_level``), once per batch for all losses of a teacher."""

    def __init__(self, student: _View, teachers: Mapping[int, _View]) -> None:
        self.student, self.teachers = student, teachers
        self._done: dict[tuple[int, str, str, str], Tensor] = {}

    def pyramid(self, teacher: int, s_level: str, t_level: str) -> Tensor:
        return self._align(teacher, "pyramid", s_level, t_level)

    def logits(self, teacher: int, s_level: str, t_level: str) -> Tensor:
        return self._align(teacher, "logits", s_level, t_level)

    def _align(self, teacher: int, kind: str, s_level: str, t_level: str) -> Tensor:
        key = (teacher, kind, s_level, t_level)
        if key not in self._done:
            view = self.teachers[teacher]
            maps = view.pyramid if kind == "pyramid" else view.logits
            assert maps is not None  # logits are collected whenever a loss of this teacher uses them
            self._done[key] = align_level(
                maps[t_level], teacher=view.grids[t_level], student=self.student.grids[s_level]
            )
        return self._done[key]


class Distiller(nn.Module):
    """Student + frozen teachers + named losses; see the module docstring."""

    def __init__(
        self,
        *,
        student: nn.Module,
        student_scale: float,
        teachers: Sequence[Teacher],
        methods: Mapping[str, Mapping[str, Any]] | None = None,
        teacher_bf16: bool = True,
        teacher_channels_last: bool = True,
    ) -> None:
        """``methods`` maps a method name ("mse", "ssim", ...) to its settings: ``teacher`` (index
        into ``teachers``, default 0) and the loss's keyword arguments. ``from_config`` builds the
        same from a ``DistillConfig``."""
        super().__init__()
        self.student = student
        self.student_scale = float(student_scale)
        self._teachers = [Teacher(freeze(t.model), float(t.scale)) for t in teachers]  # not registered: frozen
        # GPU only: the frozen teacher runs in bf16 autocast and channels-last (cheaper, no gradients to keep exact)
        self.teacher_bf16 = teacher_bf16
        self.teacher_channels_last = teacher_channels_last
        self.losses = nn.ModuleDict()
        self.pairs: dict[str, list[tuple[str, str]]] = {}
        self.loss_teacher: dict[str, int] = {}
        self.logit_slots: dict[str, tuple[int, int]] = {}
        self._student_strides = pyramid_strides(student)
        self._teacher_strides = [pyramid_strides(t.model) for t in self._teachers]
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        for name, settings in (methods or {}).items():
            kwargs = dict(settings)
            index = int(kwargs.pop("teacher", 0))
            self.add_method(name, teacher=index, build=functools.partial(loss_class(name), **kwargs))

    @classmethod
    def from_config(
        cls, cfg: DistillConfig, *, student: nn.Module, student_scale: float, teachers: Sequence[Teacher]
    ) -> Distiller:
        """The distiller of ``cfg``'s methods; each method section's ``teacher`` indexes ``teachers``."""
        distiller = cls(
            student=student,
            student_scale=student_scale,
            teachers=teachers,
            teacher_bf16=cfg.teacher_bf16,
            teacher_channels_last=cfg.teacher_channels_last,
        )
        for name, section in cfg.methods().items():
            build = functools.partial(loss_class(name).from_config, section)
            distiller.add_method(name, teacher=section.teacher, build=build)
        return distiller

    def add_method(self, name: str, *, teacher: int, build: Callable[..., DistillLoss]) -> DistillLoss:
        """Pair the student's levels with teacher ``teacher``'s and add the loss
        ``build(levels=..., student_channels=..., teacher_channels=...)`` under ``name``."""
        if not self._teachers:
            raise ValueError("distillation methods need at least one teacher")
        if not 0 <= teacher < len(self._teachers):
            raise ValueError(f"{name}: teacher index {teacher} but only {len(self._teachers)} teacher(s)")
        model = self._teachers[teacher].model
        pairing = pair_nearest if isinstance(model, ViTFeatureTeacher) else pair_levels  # one patch map of stride 14/16
        pairs = pairing(
            self._student_strides,
            self._teacher_strides[teacher],
            student_scale=self.student_scale,
            teacher_scale=self._teachers[teacher].scale,
        )
        loss = build(
            levels=[s for s, _ in pairs],
            student_channels=channels_of(self.student),
            teacher_channels=channels_of(model),
        )
        if loss.uses_logits and not (has_dense_logits(self.student) and has_dense_logits(model)):
            which, lacking = (
                ("student", self.student) if not has_dense_logits(self.student) else (f"teacher {teacher}", model)
            )
            why = ""
            if isinstance(lacking, HFDetector):
                why = (
                    f" (a {lacking.model_type} detector's classes come from object queries, not from a map of "
                    "locations; it teaches through its encoder's features: mse, ssim, mgd, msad, dsamkd's feature "
                    "branch)"
                )
            raise ValueError(
                f"{name} distills dense class logits, but the {which} has no dense logits{why}: it needs one-stage "
                "(fcos/retinanet) student and teacher (a multi-scale teacher has no single logit map); "
                "switch its logit term off (dsamkd: logit_weight=0)"
            )
        if loss.uses_logits:
            self.logit_slots[name] = self._background_slots(model)
        self.losses[name] = loss
        self.pairs[name] = pairs
        self.loss_teacher[name] = teacher
        return loss

    def _background_slots(self, teacher: nn.Module) -> tuple[int, int]:
        """Anchors per location whose background slot to drop from (student, teacher) logits (0: keep them).

        Across frameworks (a torchvision head with a background slot, an MMDetection head
        without) both sides are compared on the K real classes; otherwise as they are.
        """
        (s_anchors, s_bg), (t_anchors, t_bg) = logit_layout(self.student), logit_layout(teacher)
        if s_bg == t_bg:
            return 0, 0
        return (s_anchors if s_bg else 0), (t_anchors if t_bg else 0)

    @property
    def teachers(self) -> list[Teacher]:
        return list(self._teachers)

    def _uses_logits(self, teacher: int | None = None) -> bool:
        """Whether some loss (of ``teacher``, if given) needs dense class logits."""
        return any(
            loss.uses_logits
            for name, loss in self.losses.items()
            if teacher is None or self.loss_teacher[name] == teacher
        )

    def _teacher_view(self, index: int, images: list[Tensor]) -> _View:
        teacher = self._teachers[index]
        device = images[0].device
        if next(teacher.model.parameters()).device != device:
            teacher.model.to(device)
            if device.type == "cuda" and self.teacher_channels_last:
                teacher.model.to(memory_format=torch.channels_last)
        bf16 = device.type == "cuda" and self.teacher_bf16
        views = images
        if teacher.scale != 1.0:
            boxes = [{"boxes": torch.zeros(0, 4, device=device)} for _ in images]
            views = scale_batch(images, boxes, factor=teacher.scale)[0]
        # no_grad, not inference_mode: inference tensors cannot be saved for backward, so they had to
        # be cloned level by level every step; no_grad outputs are used as they are.
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16):
            feats = extract_features(teacher.model, views, logits=self._uses_logits(index))
        pyramid = {k: _as_float32(v) for k, v in feats.pyramid.items()}
        logits = None
        if feats.class_logits is not None:
            logits = {k: _as_float32(v) for k, v in feats.class_logits.items()}
        return _View(pyramid, logits, level_grids(pyramid, self._teacher_strides[index], _image_sizes(views)))

    def _student_view(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], _View]:
        """The student's detection losses and features on its (scaled) view of the batch."""
        if self.student_scale != 1.0:
            images, scaled = scale_batch(images, targets, factor=self.student_scale)
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in scaled]
        with DetectorTaps(self.student) as taps:
            losses = dict(self.student(images, targets))
        logits = taps.class_logits if self._uses_logits() and taps.has_logits else None
        grids = level_grids(taps.pyramid, self._student_strides, _image_sizes(images))
        return losses, _View(taps.pyramid, logits, grids)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if not self.training:
            raise RuntimeError("the distiller only trains; evaluate distiller.student on the student's own view")
        losses, student = self._student_view(images, targets)
        needed = sorted(set(self.loss_teacher.values()))
        teachers = {i: self._teacher_view(i, images) for i in needed}  # once per teacher
        masks = {lv: m for lv, grid in student.grids.items() if (m := valid_mask(grid, images[0].device)) is not None}
        aligned = _AlignedTeachers(student, teachers)
        step = int(self.step)
        for name, loss in self.losses.items():
            index, pairs = self.loss_teacher[name], self.pairs[name]
            s_logits = t_logits = None
            if loss.uses_logits:
                assert student.logits is not None  # checked in add_method
                s_logits = {s: student.logits[s] for s, _ in pairs}
                t_logits = {s: aligned.logits(index, s, t) for s, t in pairs}
                s_slots, t_slots = self.logit_slots[name]
                if s_slots:
                    s_logits = {lv: foreground_logits(z, s_slots) for lv, z in s_logits.items()}
                if t_slots:
                    t_logits = {lv: foreground_logits(z, t_slots) for lv, z in t_logits.items()}
            level_masks = {s: masks[s] for s, _ in pairs if s in masks}
            terms = loss(
                {s: student.pyramid[s] for s, _ in pairs},
                {s: aligned.pyramid(index, s, t) for s, t in pairs},
                masks=level_masks or None,
                step=step,
                student_logits=s_logits,
                teacher_logits=t_logits,
            )
            for term, value in terms.items():
                losses[f"kd_{term}"] = value
        self.step += 1
        return losses
