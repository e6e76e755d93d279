"""Build what a run trains from its plan: the student detector, or a Distiller around it.

The same function runs on the driver on the meta device (to validate a plan: shapes,
level pairs, adapters, nothing allocated, no weights read) and in each worker for real.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from detkd.config import Config, ConfigError, ModelConfig
from detkd.records import RunPlan

log = logging.getLogger("detkd.train")


def build_trainable(plan: RunPlan, *, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module]:
    """(module to optimise, student detector): the detector itself, or a Distiller around it.

    ``device="meta"`` builds the architecture only: no weights are loaded and teachers are
    built from the builder config stored in their checkpoints.
    """
    from detkd.distill.distiller import Distiller, Teacher
    from detkd.models.checkpoint import copy_matching_weights, load_teacher, same_framework
    from detkd.models.detectors import build_detector_from_config, rebuild_detector
    from detkd.models.pretrained import build_model

    cfg = plan.config
    model_cfg = resolved_model(cfg)
    meta = torch.device(device).type == "meta"
    if not meta:
        torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    with torch.device("meta") if meta else contextlib.nullcontext():
        if meta:
            student = build_detector_from_config(model_cfg, num_classes=plan.num_classes)
        else:
            student = build_model(model_cfg, num_classes=plan.num_classes)
        if not plan.distilling:
            return student, student
        if meta:
            teachers = [Teacher(rebuild_detector(t.model), t.scale) for t in plan.teachers]
        else:
            teachers = [Teacher(load_teacher(Path(t.path), t.model), t.scale) for t in plan.teachers]
        copies = cfg.distill.init_from_teacher or cfg.distill.copy_neck_head
        if copies and not same_framework(student, teachers[0].model):
            raise ValueError(
                "distill.init_from_teacher / copy_neck_head: teacher 0 and the student come from different "
                "frameworks (MMDetection vs torchvision), so no weights match by name; switch them off"
            )
        if not meta and copies:
            prefixes = None if cfg.distill.init_from_teacher else ("backbone.fpn", "head")
            copied = copy_matching_weights(student, teachers[0].model, prefixes=prefixes)
            log.info(f"[{cfg.name}] copied {len(copied)} tensors from teacher {plan.teachers[0].name}")
        distiller = Distiller.from_config(
            cfg.distill, student=student, student_scale=cfg.input.scale, teachers=teachers
        )
    return distiller, student


def resolved_model(cfg: Config) -> ModelConfig:
    """``cfg.model`` with the defaults that depend on the input view filled in: an ``hf`` model's canvas
    (``model.hf_canvas``) is the view's largest side."""
    if cfg.model.arch == "hf" and cfg.model.hf_canvas is None:
        return cfg.model.model_copy(update={"hf_canvas": cfg.input.largest_side})
    return cfg.model


def check_model_config(cfg: ModelConfig, *, where: str) -> None:
    """Build the detector of ``cfg`` on the meta device (any class count): a ConfigError if it cannot be built.

    Lets a pipeline refuse a bad model entry before its first step runs, when the data and
    teachers that a full plan needs do not exist yet.
    """
    from detkd.models.detectors import build_detector_from_config
    from detkd.models.mmdet_detector import INSTALL_HINT, MMDetUnavailable, import_mmdet

    if cfg.arch == "mmdet":
        try:
            import_mmdet()
        except MMDetUnavailable:
            # e.g. `detkd compile` on a workstation for a cluster whose image has the extra: the file is
            # checked here, the model by its step (build_plan), where a missing install is an error
            if not Path(str(cfg.mmdet_config)).is_file():
                raise ConfigError(f"{where}: model.mmdet_config: {cfg.mmdet_config} not found") from None
            log.warning(
                f"{where}: MMDetection is not installed here; its model is checked when its step runs ({INSTALL_HINT})"
            )
            return
    try:
        with torch.device("meta"):
            model = build_detector_from_config(cfg, num_classes=cfg.num_classes or 1)
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where}: model: the detector cannot be built: {message}") from exc
    missing = [key for key in ("weights", "backbone_weights") if (f := getattr(cfg, key)) and not Path(f).is_file()]
    if missing:  # e.g. compiled here for a cluster that has the file: its step checks it
        file = getattr(cfg, missing[0])
        log.warning(f"{where}: model.{missing[0]}: {file} not found here; checked when its step runs")
        return
    check_weight_files(cfg, model, where=where, report=False)  # the class count is unknown here: the plan reports


def check_weight_files(model: ModelConfig, student: nn.Module, *, where: str, report: bool = True) -> None:
    """Match ``model.backbone_weights`` and ``model.weights`` with the student built on the meta device, reading
    only the files' tensors: a file that does not fit fails here, naming its key, not in a retried Ray worker."""
    from detkd.models.checkpoint import CheckpointError, check_backbone_weights
    from detkd.models.pretrained import check_weights

    if model.backbone_weights is not None:
        try:
            check_backbone_weights(student, Path(model.backbone_weights), backbone=model.backbone)
        except CheckpointError as exc:
            raise ConfigError(f"{where}: model.backbone_weights: {exc}") from None
    if model.weights is not None:
        try:
            fit = check_weights(student, Path(model.weights))
        except CheckpointError as exc:
            raise ConfigError(f"{where}: model.weights: {exc}") from None
        if report:
            log.info(f"{where}: model.weights {fit.summary()}")
