"""The Distiller: frozen teachers outside the module tree, aligned views, one teacher pass per batch."""

from __future__ import annotations

import pytest
import torch
from factories import random_batch

from detkd.distill.distiller import Distiller, Teacher
from detkd.models import build_detector


def _batch(n: int = 2, size: int = 128):
    return random_batch([([[10.0, 12.0, 60.0, 70.0], [80.0, 20.0, 110.0, 44.0]], [1, 2])] * n, size=size)


def _student():
    torch.manual_seed(1)
    return build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=2, max_level=6, fpn_channels=32)


def _teacher(**kw):
    torch.manual_seed(2)
    return build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=3, max_level=7, fpn_channels=64, **kw)


def test_teacher_is_frozen_and_outside_the_module_tree():
    teacher = _teacher()
    distiller = Distiller(
        student=_student(),
        student_scale=0.5,
        teachers=[Teacher(teacher, 1.0)],
        methods={"mse": {"teacher": 0}, "mgd": {"teacher": 0}},
    )
    own = {id(p) for p in distiller.parameters()}
    assert not any(id(p) in own for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert "teacher" not in " ".join(distiller.state_dict())
    distiller.train()
    assert not teacher.training and distiller.student.training
    # the pyramid shift pairs the half-resolution student's P2..P6 with the teacher's P3..P7
    assert distiller.pairs["mse"] == [("p2", "p3"), ("p3", "p4"), ("p4", "p5"), ("p5", "p6"), ("p6", "p7")]


def test_gradients_reach_student_and_adapters_never_teacher():
    teacher = _teacher()
    distiller = Distiller(
        student=_student(),
        student_scale=0.5,
        teachers=[Teacher(teacher, 1.0)],
        methods={"ssim": {"teacher": 0}, "mgd": {"teacher": 0}, "dsamkd": {"teacher": 0}},
    )
    distiller.train()
    images, targets = _batch()
    losses = distiller(images, targets)
    assert {"kd_ssim", "kd_mgd", "kd_dsamkd_feature", "kd_dsamkd_logit"} <= set(losses)
    assert {"classification", "bbox_regression", "bbox_ctrness"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    student_grads = [p.grad for p in distiller.student.parameters() if p.requires_grad]
    assert all(g is not None for g in student_grads)
    for name in ("ssim", "mgd", "dsamkd"):
        params = list(distiller.losses[name].parameters())
        assert params, f"{name} has adapters/generators (student 32 ch, teacher 64 ch)"
        assert all(p.grad is not None for p in params), name
        # (SSIM of a 1x1 map is constant, so that level's adapter may get a zero gradient)
        assert sum(float(p.grad.abs().sum()) for p in params) > 0, name
    assert int(distiller.step) == 1


def test_teacher_runs_once_per_batch_for_several_losses():
    teacher = _teacher()
    calls = []
    teacher.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    distiller = Distiller(
        student=_student(),
        student_scale=0.5,
        teachers=[Teacher(teacher, 1.0)],
        methods={"mse": {"teacher": 0}, "ssim": {"teacher": 0}, "mgd": {"teacher": 0}},
    )
    distiller.train()
    distiller(*_batch())
    assert len(calls) == 1
    assert calls[0][-2:] == (128, 128)  # the teacher sees the full-resolution view


def test_student_view_is_the_exactly_scaled_reference_batch():
    seen = {}
    student = _student()

    def record(module, inputs, output) -> None:
        seen.setdefault("student", inputs[0].shape)

    student.backbone.register_forward_hook(record)
    distiller = Distiller(
        student=student, student_scale=0.5, teachers=[Teacher(_teacher(), 1.0)], methods={"mse": {"teacher": 0}}
    )
    distiller.train()
    distiller(*_batch())
    assert seen["student"][-2:] == (64, 64)


def test_msad_teacher_fused_pyramid_feeds_msad_loss_and_predicts():
    teacher = _teacher(multiscale=True)
    teacher.eval()
    images, _ = _batch()
    with torch.no_grad():
        detections = teacher(images)
    assert len(detections) == 2 and {"boxes", "scores", "labels"} <= set(detections[0])
    for weights in teacher.last_fusion_weights.values():
        assert (weights > 0).all() and torch.allclose(weights.sum(dim=1), torch.ones(weights.shape[0]))
    distiller = Distiller(
        student=_student(),
        student_scale=0.5,
        teachers=[Teacher(teacher, 1.0)],
        methods={"msad": {"teacher": 0, "ramp_iters": 0}},
    )
    distiller.train()
    losses = distiller(*_batch())
    assert losses["kd_msad"] > 0
    with pytest.raises(ValueError, match="logit"):
        Distiller(
            student=_student(), student_scale=0.5, teachers=[Teacher(teacher, 1.0)], methods={"dsamkd": {"teacher": 0}}
        )


def test_non_power_of_two_ratio_falls_back_to_resizing():
    teacher = build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=3, max_level=7, fpn_channels=32)
    distiller = Distiller(
        student=_student(), student_scale=0.75, teachers=[Teacher(teacher, 1.0)], methods={"mse": {"teacher": 0}}
    )
    assert distiller.pairs["mse"] == [(f"p{lvl}", f"p{lvl}") for lvl in range(3, 7)]
    distiller.train()
    losses = distiller(*_batch(size=128))
    assert torch.isfinite(losses["kd_mse"])


def test_bad_method_settings_are_refused():
    with pytest.raises(ValueError, match="unknown distillation method"):
        Distiller(student=_student(), student_scale=0.5, teachers=[Teacher(_teacher(), 1.0)], methods={"kl": {}})
    with pytest.raises(ValueError, match="teacher index 1"):
        Distiller(
            student=_student(), student_scale=0.5, teachers=[Teacher(_teacher(), 1.0)], methods={"mse": {"teacher": 1}}
        )
    distiller = Distiller(student=_student(), student_scale=0.5, teachers=[Teacher(_teacher(), 1.0)], methods={})
    distiller.eval()
    with pytest.raises(RuntimeError, match="only trains"):
        distiller(*_batch())


def test_any_detector_can_teach_another_architecture_and_pyramid():
    """A two-stage ResNet-18 teacher with P2-P6 at full resolution teaches a tiny FCOS at half resolution."""
    torch.manual_seed(3)
    teacher = build_detector(
        arch="fasterrcnn", backbone="resnet18", num_classes=3, min_level=2, max_level=6, fpn_channels=64
    )
    distiller = Distiller(
        student=_student(),
        student_scale=0.5,
        teachers=[Teacher(teacher, 1.0)],
        methods={"ssim": {"teacher": 0}, "mse": {"teacher": 0}},
    )
    # student P2..P5 pair with teacher P3..P6 (P6 of the student has no partner at P7)
    assert distiller.pairs["ssim"] == [("p2", "p3"), ("p3", "p4"), ("p4", "p5"), ("p5", "p6")]
    distiller.train()
    losses = distiller(*_batch())
    sum(losses.values()).backward()
    assert losses["kd_mse"] > 0 and all(p.grad is None for p in teacher.parameters())
