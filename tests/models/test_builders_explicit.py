"""One builder per architecture, meta-device builds, torchvision's P6/P7, explicit types."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detkd.config import ModelConfig
from detkd.models import (
    ARCHS,
    DETECTOR_BUILDERS,
    MultiScaleDetector,
    build_detector,
    build_detector_from_config,
    detector_config,
    fasterrcnn_from_config,
    fcos_from_config,
    has_dense_logits,
    pyramid_strides,
    retinanet_from_config,
    set_inference_thresholds,
    unwrap_model,
)
from detkd.models.backbones import BACKBONES, MOBILENET_V3_LARGE_TAPS, MOBILENET_V3_SMALL_TAPS, build_body
from detkd.models.taps import extract_features


def test_one_builder_per_arch():
    assert DETECTOR_BUILDERS == {
        "fcos": fcos_from_config,
        "retinanet": retinanet_from_config,
        "fasterrcnn": fasterrcnn_from_config,
    }
    assert ARCHS == ("fcos", "retinanet", "fasterrcnn")
    kinds = {"fcos": FCOS, "retinanet": RetinaNet, "fasterrcnn": FasterRCNN}
    for arch, kind in kinds.items():
        direct = DETECTOR_BUILDERS[arch](ModelConfig(arch=arch, fpn_channels=32), num_classes=2)
        assert type(direct) is kind
        via_entry = build_detector(arch=arch, backbone="tiny", num_classes=2, fpn_channels=32)
        assert type(via_entry) is kind
        # the entry point builds exactly what the arch builder builds
        assert {k: v.shape for k, v in direct.state_dict().items()} == {
            k: v.shape for k, v in via_entry.state_dict().items()
        }


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("arch", ["fcos", "retinanet", "fasterrcnn"])
def test_every_arch_and_backbone_builds_on_meta(arch, backbone):
    norm = "bn" if backbone.startswith("swin") else "frozen_bn"  # Swin has LayerNorms only
    with torch.device("meta"):
        model = build_detector(arch=arch, backbone=backbone, num_classes=3, fpn_channels=32, norm=norm)
    tensors = list(model.state_dict().values())
    assert tensors and all(t.is_meta for t in tensors)
    assert pyramid_strides(model) == {f"p{lvl}": 2**lvl for lvl in range(3, 8)}


@pytest.mark.parametrize("arch", ["fcos", "retinanet"])
def test_multiscale_teacher_builds_on_meta(arch):
    with torch.device("meta"):
        model = build_detector(arch=arch, backbone="resnet18", num_classes=3, fpn_channels=32, multiscale=True)
    assert isinstance(model, MultiScaleDetector)
    assert all(t.is_meta for t in model.state_dict().values())


@pytest.mark.parametrize(("channels", "groups"), [(16, 8), (32, 16), (64, 32), (128, 32)])
def test_fcos_head_keeps_two_or_more_channels_per_norm_group(channels, groups):
    model = build_detector(arch="fcos", backbone="tiny", num_classes=2, fpn_channels=channels)
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == groups and m.num_channels == channels for m in norms)


@pytest.mark.parametrize("channels", [33, 80])
def test_fcos_with_channels_its_group_norm_cannot_split_is_refused_clearly(channels):
    with pytest.raises(ValueError, match=f"fpn_channels={channels}: fpn_channels must be even below 64"):
        build_detector(arch="fcos", backbone="tiny", num_classes=2, fpn_channels=channels)


def test_max_level_above_seven_is_refused_clearly():
    with pytest.raises(ValueError, match="max_level: Input should be less than or equal to 7"):
        build_detector(arch="retinanet", backbone="tiny", num_classes=2, max_level=8)


def test_p6_p7_come_from_torchvision_and_p7_is_dropped_at_max_level_six():
    full = build_detector(arch="fcos", backbone="tiny", num_classes=2, min_level=3, max_level=7)
    assert isinstance(full.backbone.fpn.extra_blocks, LastLevelP6P7)
    assert any(k.startswith("backbone.fpn.extra_blocks.p7.") for k in full.state_dict())
    six = build_detector(arch="fcos", backbone="tiny", num_classes=2, min_level=2, max_level=6, fpn_channels=32)
    assert isinstance(six.backbone.fpn.extra_blocks, LastLevelP6P7)
    assert not any(".p7." in k for k in six.state_dict())
    five = build_detector(arch="fcos", backbone="tiny", num_classes=2, min_level=3, max_level=5)
    assert five.backbone.fpn.extra_blocks is None
    out = six.backbone(torch.rand(1, 3, 64, 64))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]


def test_every_parameter_gets_a_gradient_at_max_level_six():
    """No unused P7 conv: DDP (find_unused_parameters=False) would fail on it."""
    torch.manual_seed(0)
    model = build_detector(arch="fcos", backbone="tiny", num_classes=2, min_level=2, max_level=6, fpn_channels=32)
    model.train()
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])}]
    losses = model([torch.rand(3, 128, 128)], targets)
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("size", ["large", "small"])
def test_mobilenet_taps_are_the_last_block_of_each_stride(size):
    body = build_body(f"mobilenet_v3_{size}")
    body.module.eval()
    with torch.no_grad():
        out = body.module(torch.rand(1, 3, 64, 64))
    assert list(out) == ["c2", "c3", "c4", "c5"]
    for level, feat in zip((2, 3, 4, 5), out.values(), strict=True):
        assert feat.shape[1:] == (body.channels[level], 64 // 2**level, 64 // 2**level)
    from torchvision import models as tvm

    features = getattr(tvm, f"mobilenet_v3_{size}")(weights=None).features.eval()
    x, strides = torch.rand(1, 3, 64, 64), []
    with torch.no_grad():
        for block in features:
            x = block(x)
            strides.append(64 // x.shape[-1])
    last_of_stride = tuple(max(i for i, s in enumerate(strides) if s == 2**level) for level in (2, 3, 4, 5))
    assert {"large": MOBILENET_V3_LARGE_TAPS, "small": MOBILENET_V3_SMALL_TAPS}[size] == last_of_stride


def test_build_detector_from_config_translates_every_field():
    cfg = ModelConfig(
        arch="retinanet",
        backbone="tiny",
        min_level=2,
        max_level=6,
        fpn_channels=16,
        head_convs=3,
        anchor_sizes=[[8.0], [16.0], [32.0], [64.0], [128.0]],
        score_thresh=0.2,
        nms_thresh=0.4,
        detections_per_img=7,
        norm="frozen_bn",
        norm_eps=0.0,
        top_levels="conv_c5",
        fpn_norm="bn",
        head_norm="none",
        box_loss="giou",
        weights="/nonexistent/never-loaded.pt",
        backbone_weights="/nonexistent/never-loaded.pth",
        trainable_layers=2,
    )
    model = build_detector_from_config(cfg, num_classes=4)
    config = detector_config(model)
    # trainable_layers is a training setting: it freezes parameters, the network is the same
    foreign = {"mmdet_config", "hf_model", "hf_canvas"}
    expected = cfg.model_dump(exclude={"weights", "backbone_weights", "trainable_layers", *foreign})
    assert config == expected | {"num_classes": 4}
    assert model.score_thresh == 0.2 and model.nms_thresh == 0.4 and model.detections_per_img == 7
    assert model.head.regression_head._loss_type == "giou" and not model.backbone.fpn.extra_blocks.use_P5
    assert model.backbone.fpn.extra_blocks.p6.in_channels == 128  # the tiny body's C5
    assert isinstance(model.backbone.fpn.inner_blocks[0][1], torch.nn.BatchNorm2d)
    assert {m.eps for m in model.backbone.body.modules() if hasattr(m, "running_var")} == {0.0}
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.head.modules())
    assert not any(p.requires_grad for p in model.backbone.body.stem.parameters())
    assert (
        build_detector_from_config(cfg.model_copy(update={"num_classes": 2}), num_classes=4).detkd_config["num_classes"]
        == 2
    )
    ms = build_detector_from_config(
        ModelConfig(arch="fcos", multiscale=True, low_res_scale=0.5, fused_loss_weight=0.3, fpn_channels=32),
        num_classes=2,
    )
    assert isinstance(ms, MultiScaleDetector) and ms.fused_loss_weight == 0.3


def test_build_detector_takes_no_weights():
    with pytest.raises(TypeError):
        build_detector(arch="fcos", backbone="tiny", num_classes=2, weights="model.pt")
    with pytest.raises(TypeError):
        build_detector(arch="fcos", backbone="tiny", num_classes=2, backbone_weights="r18.pth")


def test_detkd_config_rebuilds_the_model():
    model = build_detector(arch="fcos", backbone="tiny", num_classes=2, min_level=2, max_level=6, fpn_channels=32)
    again = build_detector(**detector_config(model))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in again.state_dict().items()}
    assert detector_config(again) == detector_config(model)


def test_builders_do_not_import_checkpoint():
    """Weight loading lives in checkpoint.py, which imports the builders: never the other way round."""
    import ast
    from pathlib import Path

    import detkd.models

    folder = Path(detkd.models.__file__).parent
    for name in ("backbones.py", "detectors.py", "multiscale.py", "taps.py"):
        tree = ast.parse((folder / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and "checkpoint" in m}, name


def test_types_decide_dense_logits_strides_and_thresholds():
    fcos = build_detector(arch="fcos", backbone="tiny", num_classes=2, fpn_channels=32)
    frcnn = build_detector(arch="fasterrcnn", backbone="tiny", num_classes=2, fpn_channels=32)
    ms = build_detector(arch="retinanet", backbone="tiny", num_classes=2, fpn_channels=32, multiscale=True)
    assert has_dense_logits(fcos) and not has_dense_logits(frcnn) and not has_dense_logits(ms)
    assert pyramid_strides(ms) == {f"p{lvl}": 2**lvl for lvl in range(3, 8)}
    assert pyramid_strides(ms.detector) == {f"p{lvl}": 2**lvl for lvl in range(2, 8)}
    set_inference_thresholds(ms, score_thresh=0.01, detections_per_img=5)
    assert ms.detector.score_thresh == 0.01 and ms.detector.detections_per_img == 5
    set_inference_thresholds(frcnn, score_thresh=0.02, detections_per_img=6)
    assert frcnn.roi_heads.score_thresh == 0.02 and frcnn.roi_heads.detections_per_img == 6
    with pytest.raises(TypeError):
        pyramid_strides(torch.nn.Linear(2, 2))
    ms.eval()
    features = extract_features(ms, [torch.rand(3, 64, 64)])
    assert list(features.pyramid) == ["p3", "p4", "p5", "p6", "p7"] and features.class_logits is None


def test_unwrap_model_unwraps_only_ddp(tmp_path):
    import torch.distributed as dist

    model = build_detector(arch="fcos", backbone="tiny", num_classes=2, fpn_channels=32)
    assert unwrap_model(model) is model
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(wrapped) is model
        assert has_dense_logits(wrapped)
        assert pyramid_strides(wrapped) == pyramid_strides(model)
        assert detector_config(wrapped) == detector_config(model)
    finally:
        dist.destroy_process_group()
