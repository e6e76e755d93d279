"""YOLO and VOC splits in run configs and pipeline specs: validated, opened, planned (no Ray, no MLflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import FORMAT_CLASSES, FORMAT_IMAGES, tiny_pipeline_spec, tracking_in, write_all_formats, write_yaml

from detkd.config import ConfigError, SplitConfig, load_config
from detkd.engine.plan import build_plan, config_digest, open_sources, open_split
from detkd.pipeline.spec import data_splits, model_config, read_pipeline


@pytest.fixture
def formats(tmp_path):
    return write_all_formats(tmp_path / "data", FORMAT_IMAGES, FORMAT_CLASSES)


def test_yolo_and_voc_splits_validate_open_and_plan(formats, tiny_config, tmp_path, monkeypatch):
    cfg_dict = tiny_config(tmp_path, tmp_path / "work", train={"batch_size": 2})
    cfg_dict["data"] = {
        "train": {"yolo": "data/yolo/data.yaml", "split": "train"},
        "val": {"voc": "data/voc", "split": "train", "classes": FORMAT_CLASSES},
    }
    path = write_yaml(tmp_path / "run.yaml", cfg_dict)
    monkeypatch.chdir(tmp_path)  # relative data paths are relative to the working directory
    cfg = load_config(path)
    sources = open_sources(cfg)
    assert [len(s) for s in sources.values()] == [4, 4]
    assert sources["val"].category_names == FORMAT_CLASSES

    plan = build_plan(cfg, tracking=tracking_in(tmp_path))
    assert plan.categories == ((0, "cat"), (1, "dog"), (2, "bird"))
    assert Path(plan.config.data.train.yolo).is_absolute() and Path(plan.config.data.val.voc).is_absolute()
    assert plan.config.data.train.location() == f"{tmp_path / 'data/yolo/data.yaml'}#train"
    # which split is read enters the digest
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": cfg.data.val})})
    assert config_digest(other, ()) != config_digest(cfg, ())


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"yolo": "d.yaml"}, "needs split"),
        ({"voc": "voc"}, "needs split"),
        ({"yolo": "d.yaml", "split": "trainval"}, "train, val and test splits"),
        ({"coco": "a.json", "images": "i", "yolo": "d.yaml", "split": "train"}, "coco+images and yolo"),
        ({"parquet": "p", "voc": "v", "split": "train"}, "parquet and voc"),
        ({}, "got none"),
        ({"coco": "a.json", "images": "i", "split": "train"}, "split picks a split of a yolo or voc"),
        ({"yolo": "d.yaml", "split": "train", "classes": ["a"]}, "classes names the classes of a voc"),
        ({"voc": "v", "split": "train", "classes": ["a", "a"]}, "distinct names"),
        ({"images": "i"}, "missing coco"),
    ],
)
def test_split_config_errors_name_the_key(tmp_path, split, message):
    path = write_yaml(tmp_path / "run.yaml", {"data": {"train": split}})
    with pytest.raises(ConfigError, match="data.train") as err:
        load_config(path)
    assert message in str(err.value)


def test_open_split_reads_each_format(formats):
    for split in (
        SplitConfig(coco=formats.coco, images=formats.coco_images),
        SplitConfig(yolo=formats.yolo, split="train"),
        SplitConfig(voc=formats.voc, split="train", classes=formats.classes),
    ):
        assert open_split(split, skip_invalid=False).category_names == FORMAT_CLASSES


def test_pipeline_spec_takes_yolo_and_voc_splits(formats, tmp_path):
    spec = tiny_pipeline_spec(
        "formats", tmp_path / "work", f"sqlite:///{tmp_path / 'mlflow.db'}", teachers=[{"name": "t"}]
    )
    spec["data"] = {
        "train": {"yolo": str(formats.yolo), "split": "train"},
        "test": {"voc": str(formats.voc), "split": "train", "classes": formats.classes},
    }
    loaded = read_pipeline(write_yaml(tmp_path / "p.yaml", spec))
    name, scoring = data_splits(loaded).scoring()
    assert name == "test" and len(open_split(scoring, skip_invalid=False)) == 4
    cfg = model_config(loaded, loaded.teachers[0], role="teacher")
    assert cfg.data.train.yolo == formats.yolo and cfg.data.test.classes == FORMAT_CLASSES
