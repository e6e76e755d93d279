"""copy_matching_weights pairs FPN blocks by pyramid level, everything else by name and shape."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_fcos

from detkd.models import build_detector, copy_matching_weights


def _fcos(min_level: int, max_level: int, *, seed: int, **kw):
    return tiny_fcos(min_level=min_level, max_level=max_level, seed=seed, **kw)


def _fpn_block(key: str) -> tuple[str, int] | None:
    parts = key.split(".")
    if key.startswith("backbone.fpn.") and parts[2] in ("inner_blocks", "layer_blocks"):
        return parts[2], int(parts[3])
    return None


def test_p3_p7_teacher_into_p2_p6_student_pairs_fpn_blocks_by_level():
    teacher, student = _fcos(3, 7, seed=0), _fcos(2, 6, seed=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    source = teacher.state_dict()
    copied = copy_matching_weights(student, teacher)
    after = student.state_dict()

    # teacher FPN index i is level 3+i; student index j is level 2+j
    for kind in ("inner_blocks", "layer_blocks"):
        for level in (3, 4, 5):
            for suffix in ("0.weight", "0.bias"):
                s_key = f"backbone.fpn.{kind}.{level - 2}.{suffix}"
                t_key = f"backbone.fpn.{kind}.{level - 3}.{suffix}"
                assert s_key in copied, s_key
                assert torch.equal(after[s_key], source[t_key]), s_key
    # nothing lands in the student's P2 blocks
    p2 = [k for k in after if _fpn_block(k) is not None and _fpn_block(k)[1] == 0]
    assert p2 and not set(p2) & set(copied)
    for key in p2:
        assert torch.equal(after[key], before[key]), key
    # P6 from torchvision's LastLevelP6P7 is named by level; the student has no P7 conv
    assert {"backbone.fpn.extra_blocks.p6.weight", "backbone.fpn.extra_blocks.p6.bias"} <= set(copied)
    assert torch.equal(after["backbone.fpn.extra_blocks.p6.weight"], source["backbone.fpn.extra_blocks.p6.weight"])
    # everything else by name and shape: the whole body and head
    others = [k for k in after if not k.startswith("backbone.fpn.")]
    assert set(others) <= set(copied)
    for key in others:
        assert torch.equal(after[key], source[key]), key
    assert sorted(copied) == sorted(set(after) - set(p2))


def test_same_levels_copy_everything():
    teacher, student = _fcos(3, 7, seed=0), _fcos(3, 7, seed=1)
    copied = copy_matching_weights(student, teacher)
    assert copied == list(student.state_dict())
    for key, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
    assert all(p.requires_grad and p.is_leaf for p in student.parameters())


def test_shape_mismatches_are_left_alone():
    teacher = _fcos(3, 5, seed=0)
    torch.manual_seed(1)
    student = build_detector(arch="fcos", backbone="tiny", num_classes=5, min_level=3, max_level=5, fpn_channels=32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    copied = copy_matching_weights(student, teacher)
    logits = "head.classification_head.cls_logits.weight"
    assert logits not in copied and torch.equal(student.state_dict()[logits], before[logits])
    assert "backbone.fpn.layer_blocks.0.0.weight" in copied


def test_prefixes_select_target_keys():
    teacher, student = _fcos(3, 7, seed=0), _fcos(2, 6, seed=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    copied = copy_matching_weights(student, teacher, prefixes=("backbone.fpn.", "head."))
    assert copied and all(k.startswith(("backbone.fpn.", "head.")) for k in copied)
    assert torch.equal(student.state_dict()["backbone.body.stem.0.weight"], before["backbone.body.stem.0.weight"])
    assert copy_matching_weights(student, teacher, prefixes=("nothing.",)) == []


def test_multiscale_source_gives_its_shared_detector():
    teacher = _fcos(3, 7, seed=0, multiscale=True)  # shared network spans P2-P7
    student = _fcos(2, 6, seed=1)
    copied = copy_matching_weights(student, teacher)
    assert copied == list(student.state_dict())  # P2..P6 all exist in the shared network
    for key, value in student.state_dict().items():
        assert torch.equal(value, teacher.detector.state_dict()[key]), key
    with pytest.raises(TypeError):
        copy_matching_weights(teacher, student)
