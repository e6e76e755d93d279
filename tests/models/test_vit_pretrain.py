"""DINO pretraining of a tiny ViT (``detkd.models.vit_pretrain``, ``detkd models pretrain-vit``): the folder it
writes loads as a backbone teacher through the real loader, with weights that moved from the random init; bad
configs, empty folders and an existing output are refused naming the path, with nothing written.

Skipped without the ``hf`` extra, unless ``DETKD_REQUIRE_HF=1`` (CI sets it)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import require_hf, write_image
from typer.testing import CliRunner

require_hf()  # before anything imports transformers

from detkd.cli import app  # noqa: E402
from detkd.models.vit_pretrain import (  # noqa: E402
    PLOT_FILE,
    RECORD_FILE,
    PretrainSettings,
    build_vit,
    find_images,
    pretrain_vit,
)
from detkd.models.vit_teacher import build_vit_teacher, load_vit_weights, read_vit_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs/hf"
VIT = CONFIGS / "vit_tiny"
# Two patches a side for the global crops, one for the local ones: seconds on a CPU.
TINY = PretrainSettings(
    epochs=2, size=28, local_crops=2, batch_size=8, prototypes=32, head_hidden=32, bottleneck=16, warmup_epochs=1
)


def shapes(folder: Path, count: int = 16) -> Path:
    """``count`` 40 px images of a bright square on a dark ground, at seeded places (some in a sub-folder)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = np.full((40, 40, 3), 20, dtype=np.uint8)
        x, y = rng.integers(0, 24, 2)
        pixels[y : y + 16, x : x + 16] = rng.integers(120, 256, 3)
        write_image(folder / ("nested" if i % 4 == 0 else "") / f"{i:02d}.png", 40, 40, pixels=pixels)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pretrain")
    images = find_images(folder=shapes(root / "images"))
    out = root / "vit_dino"
    record = pretrain_vit(config=VIT, images=images, out=out, settings=TINY, image_source=str(root / "images"))
    return out, record


def test_the_folder_loads_as_a_backbone_teacher_with_trained_weights(pretrained):
    out, _ = pretrained
    teacher = build_vit_teacher(hf_config=read_vit_config(out), source=str(out))
    load_vit_weights(teacher, out)
    random = build_vit(hf_config=read_vit_config(VIT), seed=TINY.seed)
    moved = [
        name for name, tensor in random.state_dict().items()
        if not torch.equal(tensor, teacher.vit.state_dict()[name])
    ]  # fmt: skip
    assert "embeddings.patch_embeddings.projection.weight" in moved and len(moved) > 10
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert teacher.pixel_mean.flatten().tolist() == pytest.approx(saved["image_mean"])
    maps = teacher.pyramid([torch.rand(3, 40, 40), torch.rand(3, 30, 28)])
    assert maps["vit"].shape == (2, 48, 3, 3) and torch.isfinite(maps["vit"]).all()


def test_the_record_has_finite_losses_and_collapse_statistics(pretrained):
    out, record = pretrained
    saved = json.loads((out / RECORD_FILE).read_text())
    assert saved["images"] == 16 and len(saved["image_files"]) == 16 and saved["seed"] == 0
    assert [row["epoch"] for row in saved["epochs"]] == [1, 2]
    for row in saved["epochs"]:
        assert all(math.isfinite(row[k]) for k in ("loss", "teacher_entropy", "batch_entropy", "kl_teacher_student"))
        assert 0 <= row["teacher_entropy"] <= math.log(TINY.prototypes) + 1e-4
    assert saved["settings"]["size"] == 28 and saved["seconds"] > 0
    assert (out / PLOT_FILE).stat().st_size > 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_an_existing_out_is_refused_without_overwrite_and_left_intact(pretrained, tmp_path):
    out, _ = pretrained
    images = find_images(folder=shapes(tmp_path / "images", count=4))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=str(out)):
        pretrain_vit(config=VIT, images=images, out=out, settings=TINY, image_source="images")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    pretrain_vit(
        config=VIT, images=images, out=copy, settings=replace(TINY, epochs=1), image_source="images", overwrite=True
    )
    assert json.loads((copy / RECORD_FILE).read_text())["images"] == 4


def test_a_non_vit_config_and_an_empty_folder_are_refused_naming_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"rtdetr_tiny/config.json: model_type 'rt_detr' is not a vision"):
        read_vit_config(CONFIGS / "rtdetr_tiny")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_vit_config(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: no images"):
        find_images(folder=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images(folder=tmp_path / "missing")


def test_cli_refuses_bad_input_with_exit_2_and_writes_nothing(tmp_path):
    runner = CliRunner()
    images = shapes(tmp_path / "images", count=2)
    out = tmp_path / "out"
    cases = [
        (["--images", str(images), "--config", str(CONFIGS / "rtdetr_tiny")], "is not a vision transformer"),
        (["--images", str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no such image folder"),
        (["--config", str(VIT)], "exactly one of --images DIR or --pipeline"),
        (["--images", str(images), "--pipeline", str(tmp_path / "p.yaml")], "exactly one of"),
        (["--images", str(images), "--size", "30"], "multiple of the patch size 14"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["models", "pretrain-vit", "--out", str(out), *args])
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and message in " ".join(result.output.split()), result.output
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
