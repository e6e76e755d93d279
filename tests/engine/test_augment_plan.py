"""Augmentation in the run plan: the MSAD teacher's multi-scale default, one place, and digest stability."""

from __future__ import annotations

import json
import logging

from factories import tracking_in

from detkd.config import Config
from detkd.data.augment import RandomShortSide, ScaleJitterCanvas
from detkd.data.transforms import RandomHorizontalFlip, ResizeShortSide, ScaleBy
from detkd.engine.datasets import train_transform, training_transform
from detkd.engine.plan import build_plan, config_digest, resolve_augment
from detkd.records import RunPlan


def test_a_multiscale_teacher_trains_with_short_side_jitter_by_default(tiny_dataset, tiny_config, tmp_path, caplog):
    data = tiny_config(tiny_dataset, tmp_path, model={"multiscale": True})
    with caplog.at_level(logging.INFO, logger="detkd"):
        plan = build_plan(Config.model_validate(data), tracking=tracking_in(tmp_path))
    assert plan.config.input.augment.scale_jitter.short_side == (51, 64)  # [round(0.8 x 64), 64]
    assert sum("multi-scale teacher" in r.getMessage() for r in caplog.records) == 1  # logged once
    steps = train_transform(plan).transforms
    assert isinstance(steps[0], RandomShortSide) and (steps[0].min_side, steps[0].max_side) == (51, 64)
    assert RunPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # the plan stores what was used
    # the jitter is a different training run from the fixed size
    fixed = {**data, "input": {**data["input"], "augment": {"scale_jitter": {"short_side": [64, 64]}}}}
    fixed_plan = build_plan(Config.model_validate(fixed), tracking=tracking_in(tmp_path))
    assert fixed_plan.config.input.augment.scale_jitter.short_side == (64, 64)  # explicit wins
    assert fixed_plan.digest != plan.digest


def test_an_explicit_scale_jitter_wins_and_other_models_get_none():
    explicit = Config.model_validate(
        {"model": {"multiscale": True}, "input": {"size": 100, "augment": {"scale_jitter": {"ratio": [0.5, 1.5]}}}}
    )
    assert resolve_augment(explicit) is explicit
    plain = Config.model_validate({"input": {"size": 100}})
    assert resolve_augment(plain) is plain and plain.input.augment.scale_jitter is None
    steps = training_transform(resolve_augment(explicit), distilling=False).transforms
    assert isinstance(steps[0], ScaleJitterCanvas) and steps[0].canvas == 100


def test_plain_students_are_scaled_after_augmentation_distilled_ones_are_not():
    cfg = Config.model_validate({"input": {"size": 64, "scale": 0.5, "augment": {"iou_crop": {}}}})
    plain = [type(s).__name__ for s in training_transform(cfg, distilling=False).transforms]
    assert plain == ["RandomIoUCrop", "ResizeShortSide", "RandomHorizontalFlip", "ScaleBy"]
    distilled = training_transform(cfg, distilling=True).transforms
    assert not any(isinstance(s, ScaleBy) for s in distilled)
    default = training_transform(Config.model_validate({"input": {"size": 64}}), distilling=False).transforms
    assert [type(s) for s in default] == [ResizeShortSide, RandomHorizontalFlip]


def test_configs_without_augmentation_keep_their_digest():
    # input.hflip and input.augment.hflip plan the same run. Pinned at DIGEST_VERSION 3 (the torchvision model
    # settings): if this fails because the digest's content changed on purpose, bump DIGEST_VERSION and update.
    assert config_digest(Config(), ()) == "b5aa5370"
    old = {"input": {"size": 64, "scale": 0.5, "max_size": 100, "hflip": 0.3}, "model": {"min_level": 2}}
    assert config_digest(Config.model_validate(old), ()) == "1c349ea4"
    new = {"input": {"size": 64, "scale": 0.5, "max_size": 100, "augment": {"hflip": 0.3}}, "model": {"min_level": 2}}
    assert config_digest(Config.model_validate(new), ()) == "1c349ea4"


def test_the_digest_follows_the_augmentation():
    base = config_digest(Config(), ())
    assert config_digest(Config.model_validate({"input": {"augment": {"hflip": 0.0}}}), ()) != base
    on = config_digest(Config.model_validate({"input": {"augment": {"photometric": {}}}}), ())
    assert on != base
    assert config_digest(Config.model_validate({"input": {"augment": {"photometric": {"p": 0.2}}}}), ()) != on


def test_a_stored_plan_with_the_old_flip_key_reads_back(tiny_dataset, tiny_config, tmp_path):
    stored = build_plan(
        Config.model_validate(tiny_config(tiny_dataset, tmp_path)), tracking=tracking_in(tmp_path)
    ).to_dict()
    stored["config"]["input"] = {"size": 64, "max_size": None, "scale": 1.0, "hflip": 0.3}  # as checkpoints hold it
    plan = RunPlan.from_dict(json.loads(json.dumps(stored)))
    assert plan.config.input.augment.hflip == 0.3
    assert [type(s) for s in train_transform(plan).transforms] == [ResizeShortSide, RandomHorizontalFlip]
