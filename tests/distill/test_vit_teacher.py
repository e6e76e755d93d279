"""Foundation backbones as feature teachers: a vision transformer's patch map (stride 14) pairs with the student
level of the nearest footprint and lands on its grid padding-aware (real transformers DINOv2, real Distiller).

Skipped without the ``hf`` extra, unless ``DETKD_REQUIRE_HF=1`` (CI sets it)."""

from __future__ import annotations

import json
import math
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from factories import random_batch, require_hf
from torch import nn

require_hf()  # before anything imports transformers

from detkd.config import ConfigError, validate_config  # noqa: E402
from detkd.distill.distiller import Distiller, Teacher  # noqa: E402
from detkd.models import build_detector  # noqa: E402
from detkd.models.detectors import pyramid_strides  # noqa: E402
from detkd.models.vit_teacher import build_vit_teacher, read_vit_config  # noqa: E402

VIT = Path(__file__).resolve().parents[2] / "configs/hf/vit_tiny"
PADDED = 1e3


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache: nothing to find, nothing fetched


def vit(layers=(-1,)):
    torch.manual_seed(0)
    return build_vit_teacher(hf_config=read_vit_config(VIT), layers=list(layers), source=str(VIT))


def student():
    torch.manual_seed(1)
    return build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=2, max_level=6, fpn_channels=32)


class Recorder:
    """What the Distiller hands a loss: (student pyramid, aligned teacher pyramid, kwargs with the masks)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list = []
        module.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        self.calls.append(({k: v.detach() for k, v in args[0].items()}, dict(args[1]), dict(kwargs)))


def position_coded(teacher, sizes):
    """The teacher's map encodes image position: channel 0 = y, 1 = x (teacher pixels of the patch centre),
    2 = 1000 * sample, 3 = 0 on valid patches and PADDED on the padding."""
    real = teacher.pyramid
    patch = teacher.patch

    def pyramid(images):
        out = real(images)["vit"].clone()
        n, _, h, w = out.shape
        for i, (ih, iw) in enumerate(sizes):
            out[i, 0] = ((torch.arange(h) + 0.5) * patch)[:, None].expand(h, w)
            out[i, 1] = ((torch.arange(w) + 0.5) * patch)[None, :].expand(h, w)
            out[i, 2] = 1000.0 * i
            out[i, 3] = PADDED
            out[i, 3, : math.ceil(ih / patch), : math.ceil(iw / patch)] = 0.0
        return OrderedDict([("vit", out)])

    teacher.pyramid = pyramid


@pytest.mark.parametrize(("student_scale", "level"), [(1.0, "p4"), (0.5, "p3")])
def test_a_vit_patch_map_pairs_with_the_nearest_student_level_on_odd_image_sizes(student_scale, level):
    sizes = [(61, 47), (50, 64)]  # odd sizes: 5x4 and 4x5 valid patches of 14 px in a padded 5x5 map
    teacher = vit(layers=(-1, -2))
    assert pyramid_strides(teacher) == {"vit": 14} and teacher.out_channels == 48
    position_coded(teacher, sizes)
    model = student()
    distiller = Distiller(
        student=model, student_scale=student_scale, teachers=[Teacher(teacher, 1.0)], methods={"cosine": {}}
    )
    assert distiller.pairs["cosine"] == [(level, "vit")]  # footprint 14 px: p4 (16) at full size, p3 at half
    recorder = Recorder(distiller.losses["cosine"])
    images, targets = random_batch([([[4.0, 6.0, 30.0, 40.0]], [1]) for _ in sizes], sizes=sizes, seed=0)
    seen: dict = {}
    model.register_forward_pre_hook(lambda m, args: seen.update(sizes=[tuple(i.shape[-2:]) for i in args[0]]))
    distiller.train()
    losses = distiller(images, targets)
    assert torch.isfinite(losses["kd_cosine"]) and losses["kd_cosine"] > 0
    student_maps, aligned, kwargs = recorder.calls[0]
    stride = pyramid_strides(model)[level]
    assert aligned[level].shape[-2:] == student_maps[level].shape[-2:]
    assert aligned[level].shape[1] == 48  # the teacher's width: the adapter maps the student's 32 onto it
    for i, ((hs, ws), (ht, wt)) in enumerate(zip(seen["sizes"], sizes, strict=True)):
        rows, cols = math.ceil(hs / stride), math.ceil(ws / stride)
        region = aligned[level][i, :4, :rows, :cols]
        y = ((torch.arange(rows) + 0.5) * stride * ht / hs).clamp(7, (math.ceil(ht / 14) - 0.5) * 14)
        x = ((torch.arange(cols) + 0.5) * stride * wt / ws).clamp(7, (math.ceil(wt / 14) - 0.5) * 14)
        torch.testing.assert_close(region[0], y[:, None].expand(rows, cols), atol=1e-3, rtol=0)
        torch.testing.assert_close(region[1], x[None, :].expand(rows, cols), atol=1e-3, rtol=0)
        torch.testing.assert_close(region[2], torch.full((rows, cols), 1000.0 * i))  # its own sample
        assert region[3].abs().max() < 1e-2  # never the padded patches
        mask = kwargs["masks"].get(level) if kwargs["masks"] else None
        if mask is not None:
            assert mask[i, 0, :rows, :cols].all() and int(mask[i, 0].sum()) == rows * cols


def saved_vit(tmp_path: Path) -> Path:
    folder = tmp_path / "dino_tiny"
    vit().vit.save_pretrained(folder)
    return folder


def plan_with(tmp_path, tiny_dataset, tiny_config, teacher: dict, **methods):
    from detkd.engine.plan import build_plan
    from detkd.records import TrackingContext

    config = tiny_config(tiny_dataset, tmp_path)
    config["distill"] = {"teachers": [teacher], **methods}
    cfg = validate_config(config, source="test")
    return build_plan(cfg, tracking=TrackingContext(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="detkd"))


def test_a_backbone_folder_teaches_beside_nothing_else_and_its_features_are_the_folders(
    tmp_path, tiny_dataset, tiny_config
):
    folder = saved_vit(tmp_path)
    plan = plan_with(tmp_path, tiny_dataset, tiny_config, {"backbone": str(folder), "layers": [-1]}, cosine={})
    (spec,) = plan.teachers
    assert spec.model["arch"] == "vit" and spec.path == str(folder) and spec.scale == 1.0
    from detkd.models.checkpoint import load_teacher

    loaded, original = load_teacher(Path(spec.path), spec.model), vit()
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        assert torch.allclose(loaded.pyramid(images)["vit"], original.eval().pyramid(images)["vit"], atol=1e-5)


def test_a_backbone_that_is_not_there_or_not_a_vit_is_refused_naming_it(tmp_path, tiny_dataset, tiny_config):
    with pytest.raises(ConfigError, match=r"dinov2.*facebook/dinov2-small.*not in the local Hugging Face cache"):
        plan_with(tmp_path, tiny_dataset, tiny_config, {"backbone": "dinov2"}, cosine={})
    detector = tmp_path / "rtdetr"
    detector.mkdir()
    shutil.copy(VIT.parent / "rtdetr_tiny/config.json", detector / "config.json")
    with pytest.raises(ConfigError, match=r"model_type 'rt_detr' is not a vision transformer"):
        plan_with(tmp_path, tiny_dataset, tiny_config, {"backbone": str(detector)}, cosine={})
    folder = saved_vit(tmp_path)
    with pytest.raises(ConfigError, match=r"layers: 7 is not a block of this 3-block dinov2"):
        plan_with(tmp_path, tiny_dataset, tiny_config, {"backbone": str(folder), "layers": [7]}, cosine={})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))  # weights of a 48-wide one
    with pytest.raises(ConfigError, match=r"dino_tiny: its weights do not fit its dinov2 config"):
        plan_with(tmp_path, tiny_dataset, tiny_config, {"backbone": str(folder)}, cosine={})
    with pytest.raises(ConfigError, match="source or its backbone"):
        plan_with(tmp_path, tiny_dataset, tiny_config, {"backbone": str(folder), "source": "x.pt"}, cosine={})
