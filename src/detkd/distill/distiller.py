"""The distiller: one trainable student, frozen teachers, named distillation terms.

Like timm's distillation task, teachers are kept OUT of the module tree: they are
never in ``distiller.parameters()``, the optimizer or a DDP wrapper, and
``distiller.train()`` never switches them out of eval mode. Each teacher runs once
per batch under ``torch.inference_mode`` on its own view of the same augmented
batch; every loss gets student/teacher pyramids already paired by level
(pyramid shift for 2**k resolution ratios, resizing otherwise).

``forward(images, targets)`` returns a loss dict exactly like a torchvision
detector in training mode, so the same training loop runs both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detkd.data.transforms import scale_batch
from detkd.distill.dsamkd import DSAMKDLoss
from detkd.distill.functional import pair_levels, resize_to
from detkd.distill.mgd import MGDLoss
from detkd.distill.msad import MSADLoss
from detkd.distill.mse import FeatureMSELoss
from detkd.distill.ssim import SSIMFeatureLoss
from detkd.models.detectors import pyramid_strides
from detkd.models.taps import DetectorTaps, Features, extract_features, has_dense_logits

# One name -> loss class table for this family (the only string lookup).
LOSSES: dict[str, type[nn.Module]] = {
    "mse": FeatureMSELoss,
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
    return int(model.backbone.out_channels)


class Distiller(nn.Module):
    """Student + frozen teachers + named losses; see the module docstring."""

    def __init__(
        self,
        *,
        student: nn.Module,
        student_scale: float,
        teachers: Sequence[Teacher],
        methods: Mapping[str, Mapping[str, Any]],
        teacher_bf16: bool = True,
        teacher_channels_last: bool = True,
    ) -> None:
        """``methods`` maps a method name ("mse", "ssim", ...) to its settings, which
        include ``teacher`` (index into ``teachers``) and the loss's keyword arguments."""
        super().__init__()
        if not teachers and methods:
            raise ValueError("distillation methods need at least one teacher")
        self.student = student
        self.student_scale = float(student_scale)
        self._teachers = [Teacher(freeze(t.model), float(t.scale)) for t in teachers]  # not registered: frozen
        # GPU only: the frozen teacher runs in bf16 autocast and channels-last (cheaper, no gradients to keep exact)
        self.teacher_bf16 = teacher_bf16
        self.teacher_channels_last = teacher_channels_last
        self.losses = nn.ModuleDict()
        self.pairs: dict[str, list[tuple[str, str]]] = {}
        self.loss_teacher: dict[str, int] = {}
        student_strides = pyramid_strides(student)
        for name, settings in methods.items():
            if name not in LOSSES:
                raise ValueError(f"unknown distillation method {name!r}; choose from {sorted(LOSSES)}")
            kwargs = dict(settings)
            index = int(kwargs.pop("teacher", 0))
            if index >= len(self._teachers):
                raise ValueError(f"{name}: teacher index {index} but only {len(self._teachers)} teacher(s)")
            teacher = self._teachers[index]
            pairs = pair_levels(
                student_strides,
                pyramid_strides(teacher.model),
                student_scale=self.student_scale,
                teacher_scale=teacher.scale,
            )
            if (
                name == "dsamkd"
                and kwargs.get("logit_weight", 1.0) > 0
                and not (has_dense_logits(student) and has_dense_logits(teacher.model))
            ):
                raise ValueError(
                    "dsamkd's logit branch needs one-stage (fcos/retinanet) student and teacher "
                    "(a multi-scale teacher has no single logit map); set dsamkd.logit_weight=0"
                )
            self.losses[name] = LOSSES[name](
                levels=[s for s, _ in pairs],
                student_channels=channels_of(student),
                teacher_channels=channels_of(teacher.model),
                **kwargs,
            )
            self.pairs[name] = pairs
            self.loss_teacher[name] = index
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def teachers(self) -> list[Teacher]:
        return list(self._teachers)

    def _teacher_features(self, teacher: Teacher, images: list[Tensor]) -> Features:
        device = images[0].device
        if next(teacher.model.parameters()).device != device:
            teacher.model.to(device)
            if device.type == "cuda" and self.teacher_channels_last:
                teacher.model.to(memory_format=torch.channels_last)
        bf16 = device.type == "cuda" and self.teacher_bf16
        views = (
            images
            if teacher.scale == 1.0
            else scale_batch(
                images, [{"boxes": torch.zeros(0, 4, device=device)} for _ in images], factor=teacher.scale
            )[0]
        )
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16):
            feats = extract_features(teacher.model, views)
        # inference tensors cannot be saved for backward; a float32 clone outside inference mode can
        pyramid = OrderedDict((k, v.float().clone()) for k, v in feats.pyramid.items())
        logits = None
        if feats.class_logits is not None:
            logits = OrderedDict((k, v.float().clone()) for k, v in feats.class_logits.items())
        return Features(pyramid, logits)

    @staticmethod
    def _paired(
        student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], pairs: list[tuple[str, str]]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        s_out, t_out = {}, {}
        for s_name, t_name in pairs:
            s_out[s_name] = student[s_name]
            t_out[s_name] = resize_to(teacher[t_name], tuple(student[s_name].shape[-2:]))
        return s_out, t_out

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        if not self.training:
            raise RuntimeError("the distiller only trains; evaluate distiller.student on the student's own view")
        if self.student_scale != 1.0:
            s_images, s_targets = scale_batch(images, targets, factor=self.student_scale)
            s_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in s_targets]
        else:
            s_images, s_targets = images, targets
        with DetectorTaps(self.student) as taps:
            losses = dict(self.student(s_images, s_targets))
        needed = sorted(set(self.loss_teacher.values()))
        teacher_feats = {i: self._teacher_features(self._teachers[i], images) for i in needed}  # once per teacher
        step = int(self.step)
        for name, loss in self.losses.items():
            feats = teacher_feats[self.loss_teacher[name]]
            s_pyr, t_pyr = self._paired(taps.pyramid, feats.pyramid, self.pairs[name])
            extra: dict[str, Any] = {"step": step}
            if name == "dsamkd" and taps.has_logits and feats.class_logits is not None:
                extra["student_logits"], extra["teacher_logits"] = self._paired(
                    taps.class_logits, feats.class_logits, self.pairs[name]
                )
            for term, value in loss(s_pyr, t_pyr, **extra).items():
                losses[f"kd_{term}"] = value
        self.step += 1
        return losses
