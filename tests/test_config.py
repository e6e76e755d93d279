"""Typed configs: clear errors naming the key, dotted overrides."""

from __future__ import annotations

import pytest

from detkd.config import ConfigError, apply_overrides, load_config, parse_override


def _write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    path = _write(tmp_path, "name: t\nmodel: {arch: retinanet}\n")
    cfg = load_config(
        path, ["input.scale=0.5", "model.min_level=2", "optim.milestones=[0.5, 0.8]", "model.weights=null"]
    )
    assert cfg.model.arch == "retinanet"
    assert cfg.input.scale == 0.5 and cfg.input.model_size == 64
    assert cfg.model.min_level == 2
    assert cfg.optim.milestones == [0.5, 0.8]
    assert cfg.model.weights is None


def test_unknown_key_is_named(tmp_path):
    path = _write(tmp_path, "model: {archh: fcos}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: model.archh: unknown key" in str(err.value)


def test_wrong_type_and_range_are_named(tmp_path):
    path = _write(tmp_path, "train: {epochs: zero}\noptim: {lr: -1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "train.epochs" in text and "optim.lr" in text


def test_invalid_choice_and_cross_field_check(tmp_path):
    path = _write(tmp_path, "model: {arch: yolo}\n")
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(path)
    path = _write(tmp_path, "model: {min_level: 4, max_level: 3}\n")
    with pytest.raises(ConfigError, match="max_level"):
        load_config(path)


def test_split_needs_one_format(tmp_path):
    path = _write(tmp_path, "data: {train: {coco: a.json}}\n")
    with pytest.raises(ConfigError, match="data.train"):
        load_config(path)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = _write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    path = _write(tmp_path, "- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("input.scale")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("input..scale=1")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"input": 3}, ["input.scale=0.5"])


def test_overrides_enter_a_list_of_named_entries_by_name():
    spec = {"students": [{"name": "a", "settings": {"train": {"epochs": 16}}}, {"name": "b"}]}
    out = apply_overrides(spec, ["students.a.settings.train.epochs=1", "students.b.settings.seed=3"])
    assert out["students"] == [
        {"name": "a", "settings": {"train": {"epochs": 1}}},
        {"name": "b", "settings": {"seed": 3}},
    ]
    assert spec["students"][0]["settings"]["train"]["epochs"] == 16  # the input is not changed
    with pytest.raises(ConfigError, match=r"no entry named 'c' at students.c \(entries: a, b\)"):
        apply_overrides(spec, ["students.c.settings.seed=1"])
    with pytest.raises(ConfigError, match="students is a list; name one of its entries"):
        apply_overrides(spec, ["students.a=1"])


def test_override_of_unknown_key_is_refused(tmp_path):
    path = _write(tmp_path, "name: t\n")
    with pytest.raises(ConfigError, match="input.scal: unknown key"):
        load_config(path, ["input.scal=0.5"])


def test_model_section_mirrors_the_builder_keywords():
    """Every ModelConfig field but the weight files (loaded by models.checkpoint) reaches a builder,
    and every builder keyword is a ModelConfig field: nothing in the config is silently dropped."""
    import inspect

    from detkd.config import NETWORK_KEYS, TORCHVISION_MODEL_KEYS, ModelConfig
    from detkd.models import build_fasterrcnn, build_fcos, build_retinanet
    from detkd.models.mmdet_detector import build_mmdet_detector

    weight_files = {"weights", "backbone_weights"}
    mmdet_only = {"mmdet_config"}  # arch mmdet: build_mmdet_detector reads the parsed file
    hf_only = {"hf_model", "hf_canvas"}  # arch hf: build_hf_detector reads the parsed config, the folder, the canvas
    training = {"trainable_layers"}  # build_detector_from_config freezes parameters; the network is the same
    assert set(NETWORK_KEYS) == set(ModelConfig.model_fields) - weight_files - mmdet_only - hf_only - training
    assert set(TORCHVISION_MODEL_KEYS) == set(NETWORK_KEYS) - {"arch", "num_classes"} | {"backbone_weights"}
    multiscale = {"multiscale", "low_res_scale", "fused_loss_weight"}  # multiscale_from_config wraps a builder
    builder_keys = set().union(
        *(inspect.signature(b).parameters for b in (build_fcos, build_retinanet, build_fasterrcnn))
    )
    assert builder_keys | multiscale | {"arch"} == set(NETWORK_KEYS)
    for builder in (build_fcos, build_retinanet, build_fasterrcnn):  # defaults live in ModelConfig alone
        assert all(p.default is inspect.Parameter.empty for p in inspect.signature(builder).parameters.values())
    assert mmdet_only < set(inspect.signature(build_mmdet_detector).parameters)
