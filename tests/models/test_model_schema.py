"""One model schema: ModelConfig holds every model key and default; checkpoints rebuild what was trained."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection.fcos import FCOSHead

from detkd.config import NETWORK_KEYS, TORCHVISION_MODEL_KEYS, Config, ModelConfig, is_local_path
from detkd.engine.plan import absolute_paths
from detkd.models import build_detector, build_fcos, fcos_from_config, load_detector, save_detector
from detkd.models.checkpoint import (
    CheckpointError,
    read_checkpoint_meta,
    save_payload,
    set_head_norm_groups,
)
from detkd.models.detectors import single_scale
from detkd.records import CHECKPOINT_VERSION, CheckpointMeta


def _groups(model: nn.Module) -> set[int]:
    return {m.num_groups for m in single_scale(model).head.modules() if isinstance(m, nn.GroupNorm)}


def _old_payload(model: nn.Module, *, keep_design: bool) -> dict:
    """A detector payload as detkd wrote it with format 2 (no ``design`` key before 6422bd7)."""
    config = dict(model.detkd_config)
    if not keep_design:
        config.pop("design")
    return {
        "format": "detkd.detector/2",
        "model": config,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "meta": {"name": "old", "role": "teacher", "val/AP": 0.5},
    }


def _tiny_fcos(channels: int) -> nn.Module:
    torch.manual_seed(0)
    return build_detector(arch="fcos", num_classes=2, min_level=3, max_level=5, fpn_channels=channels)


def test_builders_take_their_defaults_from_model_config():
    for name, parameter in inspect.signature(build_fcos).parameters.items():
        assert parameter.default is inspect.Parameter.empty, name
    cfg = ModelConfig(fpn_channels=32)
    torch.manual_seed(0)
    via_config = fcos_from_config(cfg, num_classes=2).state_dict()
    torch.manual_seed(0)
    via_entry = build_detector(num_classes=2, fpn_channels=32).state_dict()
    assert via_config.keys() == via_entry.keys()
    assert all(torch.equal(via_config[k], via_entry[k]) for k in via_config)


def test_torchvision_keys_are_read_off_the_schema():
    assert "fpn_channels" in TORCHVISION_MODEL_KEYS and "weights" not in TORCHVISION_MODEL_KEYS
    assert "mmdet_config" not in TORCHVISION_MODEL_KEYS and "arch" not in TORCHVISION_MODEL_KEYS
    assert set(build_detector(num_classes=2, fpn_channels=32).detkd_config) == set(NETWORK_KEYS)


def test_new_checkpoint_records_its_format_and_validated_config(tmp_path):
    path = tmp_path / "model.pt"
    model = _tiny_fcos(32)
    save_detector(path, model, meta={"name": "m", "step": 3, "val/AP": 0.25, "reference_size": 64})
    meta = read_checkpoint_meta(path)
    assert meta.format_version == CHECKPOINT_VERSION == 3 and meta.format == "detkd.detector/3"
    assert ModelConfig.model_validate(meta.model).fpn_channels == 32 and meta.num_classes == 2
    assert (meta.name, meta.step, meta.metrics, meta.extra) == ("m", 3, {"val/AP": 0.25}, {"reference_size": 64})
    loaded, flat = load_detector(path)
    assert flat == {"name": "m", "step": 3, "val/AP": 0.25, "reference_size": 64}
    assert _groups(loaded) == {16}


def test_format_2_fpn_32_without_design_is_refused_naming_the_format(tmp_path):
    """Before detkd 7bc5af0 an fpn-32 FCOS head had torchvision's GroupNorm(32); the file cannot say which."""
    old = _tiny_fcos(32)
    set_head_norm_groups(old, 32)  # the network the old code built
    assert _groups(old) == {m.num_groups for m in FCOSHead(32, 1, 3).modules() if isinstance(m, nn.GroupNorm)}
    path = tmp_path / "old.pt"
    save_payload(path, _old_payload(old, keep_design=False))
    with pytest.raises(CheckpointError, match=r"checkpoint format detkd\.detector/2 .*GroupNorm has 32 groups"):
        load_detector(path)

    loaded, meta = load_detector(path, head_norm_groups=32)
    assert _groups(loaded) == {32} and meta["val/AP"] == 0.5
    image = [torch.rand(3, 64, 64)]
    old.eval()
    with torch.no_grad():
        expected, got = old(image)[0], loaded(image)[0]
        wrong = load_detector(path, head_norm_groups=16)[0](image)[0]
    assert torch.equal(expected["scores"], got["scores"]) and torch.equal(expected["boxes"], got["boxes"])
    assert not torch.equal(expected["scores"], wrong["scores"])  # what a silent 16-group load predicted


def test_format_2_that_names_its_design_rebuilds_with_todays_groups(tmp_path):
    path = tmp_path / "old.pt"
    model = _tiny_fcos(32)
    save_payload(path, _old_payload(model, keep_design=True))
    assert _groups(load_detector(path)[0]) == {16}


def test_format_2_at_64_channels_rebuilds_without_asking(tmp_path):
    path = tmp_path / "old.pt"
    save_payload(path, _old_payload(_tiny_fcos(64), keep_design=False))
    loaded, _ = load_detector(path)
    assert _groups(loaded) == {32}


def test_unknown_future_format_is_refused_by_name(tmp_path):
    path = tmp_path / "new.pt"
    payload = _old_payload(_tiny_fcos(32), keep_design=True) | {"format": "detkd.detector/9"}
    save_payload(path, payload)
    with pytest.raises(CheckpointError, match=r"format detkd\.detector/9 is not one this detkd reads"):
        load_detector(path)


def test_checkpoint_meta_round_trips_the_flat_meta():
    flat = {"plan": {"version": 1}, "name": "n", "mlflow_run_id": None, "val/AP": 0.1, "custom": [1]}
    meta = CheckpointMeta.from_meta_dict(flat, model={"arch": "fcos", "num_classes": 2}, format_version=3)
    assert meta.plan == {"version": 1} and meta.extra == {"custom": [1]} and meta.metrics == {"val/AP": 0.1}
    assert meta.meta_dict() == {"plan": {"version": 1}, "name": "n", "val/AP": 0.1, "custom": [1]}


def test_every_path_field_is_made_absolute_by_type(tmp_path):
    cfg = Config.model_validate(
        {
            "data": {"train": {"coco": "a.json", "images": "imgs"}, "val": {"parquet": "s3://bucket/val"}},
            "model": {"weights": "w.pt", "backbone_weights": "b.pth"},
            "run": {"storage_path": "s3://bucket/ray", "output_dir": "out"},
            "distill": {"teachers": [{"source": "t", "mmdet_config": "t.py"}]},
        }
    )
    fixed = absolute_paths(cfg, tmp_path)
    assert fixed.data.train.coco == tmp_path / "a.json" and fixed.data.train.images == tmp_path / "imgs"
    assert fixed.model.weights == tmp_path / "w.pt" and fixed.model.backbone_weights == tmp_path / "b.pth"
    assert fixed.run.output_dir == tmp_path / "out" and fixed.run.storage_path == "s3://bucket/ray"
    assert fixed.distill.teachers[0].mmdet_config == tmp_path / "t.py"
    assert fixed.distill.teachers[0].source == "t"  # a name or reference, not a path field
    assert fixed.model.mmdet_config is None
    # every Path-typed field in the schema is marked: a new one cannot be forgotten
    for section in (ModelConfig, Config.model_fields["run"].annotation):
        for name, field in section.model_fields.items():
            if "Path" in str(field.annotation):
                assert is_local_path(field), name
    assert isinstance(fixed.data.val.parquet, Path | str)


def test_digest_depends_on_its_version(monkeypatch):
    from detkd.engine import plan as plan_module

    cfg = Config()
    before = plan_module.config_digest(cfg, ())
    monkeypatch.setattr(plan_module, "DIGEST_VERSION", plan_module.DIGEST_VERSION + 1)
    assert plan_module.config_digest(cfg, ()) != before


def test_format_2_widths_the_old_code_could_not_build_rebuild_with_todays_groups(tmp_path):
    """Before 7bc5af0 fpn_channels had to be a multiple of 32: a 16-channel format-2 file is from after it."""
    path = tmp_path / "old.pt"
    save_payload(path, _old_payload(_tiny_fcos(16), keep_design=False))
    assert _groups(load_detector(path)[0]) == {8}


def test_a_teacher_whose_head_groups_are_unknown_is_refused_when_planned(tmp_path):
    from detkd.config import ConfigError
    from detkd.engine.teachers import resolve_teachers

    path = tmp_path / "old.pt"
    save_payload(path, _old_payload(_tiny_fcos(32), keep_design=False))
    cfg = Config.model_validate({"distill": {"teachers": [{"source": str(path), "input_scale": 1.0}]}})
    with pytest.raises(ConfigError, match=r"distill.teachers\[0\]: .*format detkd\.detector/2"):
        resolve_teachers(cfg, num_classes=2, where="run")
