"""Losses built from their config sections, the Distiller from a DistillConfig, and ``uses_logits``."""

from __future__ import annotations

import pytest
from factories import random_batch, tiny_fcos
from torch import Tensor

from detkd.config import DistillConfig, DSAMKDConfig, MGDConfig, MSADConfig, MSEConfig, SSIMConfig, TeacherRef
from detkd.distill import DistillLoss, DSAMKDLoss, FeatureMSELoss, MGDLoss, MSADLoss, SSIMFeatureLoss
from detkd.distill.distiller import LOSSES, Distiller, Teacher
from detkd.models import build_detector

GEOMETRY = {"levels": ("p3", "p4"), "student_channels": 4, "teacher_channels": 4}


def _fcos(min_level: int, max_level: int, channels: int, **kw):
    return tiny_fcos(channels, min_level=min_level, max_level=max_level, seed=min_level, **kw)


def _batch():
    return random_batch([([[10.0, 12.0, 60.0, 70.0]], [1])] * 2, size=128, seed=None)


def test_each_loss_takes_every_field_of_its_section() -> None:
    mse = FeatureMSELoss.from_config(MSEConfig(weight=2.5), **GEOMETRY)
    assert isinstance(mse, FeatureMSELoss) and mse.weight == 2.5 and mse.levels == ("p3", "p4")
    ssim = SSIMFeatureLoss.from_config(SSIMConfig(weight=2.0, adapter=True, window_size=7, sigma=1.1), **GEOMETRY)
    assert (ssim.weight, ssim.window_size, ssim.sigma) == (2.0, 7, 1.1)
    assert set(ssim.adapters) == {"p3", "p4"}  # adapter=True forces one at equal channels
    mgd = MGDLoss.from_config(MGDConfig(weight=5e-7, mask_ratio=0.45), **GEOMETRY)
    assert (mgd.weight, mgd.mask_ratio) == (5e-7, 0.45)
    msad = MSADLoss.from_config(MSADConfig(alpha=0.3, temperature=2.0, ramp_iters=7), **GEOMETRY)
    assert (msad.alpha, msad.temperature, msad.ramp_iters) == (0.3, 2.0, 7)
    section = DSAMKDConfig(
        feature_weight=1e-5,
        logit_weight=0.25,
        kernel_sizes=[1, 3],
        mask_ratio=0.3,
        attention_temperature=0.7,
        logit_temperature=2.0,
    )
    dsamkd = DSAMKDLoss.from_config(section, levels=("p3",), student_channels=3, teacher_channels=4)
    assert (dsamkd.feature_weight, dsamkd.logit_weight, dsamkd.kernel_sizes, dsamkd.mask_ratio) == (
        1e-5,
        0.25,
        (1, 3),
        0.3,
    )
    assert (dsamkd.attention_temperature, dsamkd.logit_temperature) == (0.7, 2.0)
    assert set(dsamkd.align) == {"p3"} and len(dsamkd.generators["p3"]) == 2


def test_uses_logits_is_declared_by_each_loss() -> None:
    assert not any(LOSSES[name](**GEOMETRY).uses_logits for name in ("mse", "ssim", "mgd", "msad"))
    assert DSAMKDLoss(**GEOMETRY).uses_logits
    assert not DSAMKDLoss(**GEOMETRY, logit_weight=0.0).uses_logits


def test_distiller_from_config_picks_each_method_teacher() -> None:
    cfg = DistillConfig(
        teachers=[TeacherRef(source="a"), TeacherRef(source="b")],
        mse=MSEConfig(teacher=1, weight=2.0),
        ssim=SSIMConfig(teacher=0, window_size=5),
        dsamkd=DSAMKDConfig(teacher=1, logit_weight=0.0),
        teacher_bf16=False,
        teacher_channels_last=False,
    )
    near = Teacher(_fcos(2, 6, 32), 1.0)  # P2-P6, 32 channels: the shift leaves the student's P6 unpaired
    far = Teacher(_fcos(3, 7, 64), 1.0)  # P3-P7, 64 channels
    student = _fcos(2, 6, 32)
    distiller = Distiller.from_config(cfg, student=student, student_scale=0.5, teachers=[near, far])
    assert list(distiller.losses) == ["mse", "ssim", "dsamkd"]
    assert distiller.loss_teacher == {"mse": 1, "ssim": 0, "dsamkd": 1}
    assert distiller.pairs["ssim"] == [("p2", "p3"), ("p3", "p4"), ("p4", "p5"), ("p5", "p6")]
    assert distiller.pairs["mse"] == distiller.pairs["ssim"] + [("p6", "p7")]
    assert distiller.losses["mse"].weight == 2.0 and distiller.losses["ssim"].window_size == 5
    assert set(distiller.losses["mse"].adapters) == {"p2", "p3", "p4", "p5", "p6"}  # 32 -> 64 channels
    assert not distiller.teacher_bf16 and not distiller.teacher_channels_last
    distiller.train()
    losses = distiller(*_batch())
    assert {"kd_mse", "kd_ssim", "kd_dsamkd_feature"} <= set(losses) and "kd_dsamkd_logit" not in losses
    empty = Distiller.from_config(DistillConfig(), student=_fcos(2, 6, 32), student_scale=0.5, teachers=[])
    assert len(empty.losses) == 0


class _LogitProbe(DistillLoss):
    """A custom loss that declares it needs logits: the Distiller must hand them over (no name checks)."""

    def __init__(self, *, levels, student_channels: int, teacher_channels: int) -> None:
        super().__init__(levels=levels)
        self.seen: dict[str, object] = {}

    @property
    def uses_logits(self) -> bool:
        return True

    def forward(self, student, teacher, *, masks=None, step=0, student_logits=None, teacher_logits=None):
        self.seen = {"student_logits": student_logits, "teacher_logits": teacher_logits}
        return {"probe": sum(v.sum() for v in student_logits.values()) * 0.0}


def test_logits_reach_any_loss_that_declares_it_needs_them() -> None:
    distiller = Distiller(student=_fcos(2, 6, 32), student_scale=0.5, teachers=[Teacher(_fcos(3, 7, 64), 1.0)])
    probe = distiller.add_method("probe", teacher=0, build=_LogitProbe)
    distiller.train()
    losses = distiller(*_batch())
    assert "kd_probe" in losses
    s_logits, t_logits = probe.seen["student_logits"], probe.seen["teacher_logits"]
    assert isinstance(s_logits, dict) and isinstance(t_logits, dict)
    assert list(s_logits) == list(t_logits) == ["p2", "p3", "p4", "p5", "p6"]  # keyed by student level
    for level, z in s_logits.items():
        assert isinstance(z, Tensor) and z.shape == t_logits[level].shape and z.shape[1] == 4  # 3 classes + bg


def test_logit_losses_need_dense_logits_on_both_sides() -> None:
    two_stage = build_detector(
        arch="fasterrcnn", backbone="tiny", num_classes=3, min_level=2, max_level=6, fpn_channels=32
    )
    with pytest.raises(ValueError, match=r"dsamkd distills dense class logits.*student"):
        Distiller(
            student=two_stage,
            student_scale=0.5,
            teachers=[Teacher(_fcos(3, 7, 64), 1.0)],
            methods={"dsamkd": {}},
        )
    multiscale = _fcos(3, 7, 64, multiscale=True)
    with pytest.raises(ValueError, match=r"probe distills dense class logits.*teacher 0"):
        Distiller(student=_fcos(2, 6, 32), student_scale=0.5, teachers=[Teacher(multiscale, 1.0)]).add_method(
            "probe", teacher=0, build=_LogitProbe
        )
    # with its logit branch off, DSAMKD is a feature loss and any teacher will do
    ok = Distiller(
        student=two_stage,
        student_scale=0.5,
        teachers=[Teacher(multiscale, 1.0)],
        methods={"dsamkd": {"logit_weight": 0.0}},
    )
    assert not ok.losses["dsamkd"].uses_logits
