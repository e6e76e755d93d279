"""model.weights as users bring them: torchvision's published detectors give torchvision's detections, other
classes re-initialise the class layers alone, a poor fit is refused, teachers stay strict."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from factories import tiny_fcos
from torch import nn
from torchvision.models import detection as tvd
from torchvision.models.detection._utils import overwrite_eps
from torchvision.ops import FrozenBatchNorm2d

from detkd.config import NETWORK_KEYS, ModelConfig
from detkd.models import (
    CheckpointError,
    build_detector,
    build_detector_from_config,
    build_model,
    load_detector,
    save_detector,
)
from detkd.models.checkpoint import load_payload, load_teacher, save_payload
from detkd.models.detectors import NormalizeAndPad, rebuild_detector
from detkd.models.pretrained import check_weights
from detkd.models.torchvision_zoo import (
    NOT_EXPRESSIBLE,
    TORCHVISION_FILES,
    TORCHVISION_ZOO,
    torchvision_model_config,
)

# torchvision's v1 files (and FCOS's) hold FrozenBatchNorm2d statistics under pre-0.13 key names; v2 files are a
# state_dict() of BatchNorm2d models. Its v1 COCO files run with FrozenBatchNorm2d eps 0 (overwrite_eps).
V1_FILES = ("fcos_resnet50_fpn", "retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn")
EPS_ZERO = ("retinanet_resnet50_fpn", "fasterrcnn_resnet50_fpn")
CLASS_LAYERS = {
    "fcos": ("head.classification_head.cls_logits",),
    "retinanet": ("head.classification_head.cls_logits",),
    "fasterrcnn": ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
}


def _freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm2d -> FrozenBatchNorm2d with the same numbers: what torchvision's pretrained builders hold."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def _published(name: str) -> nn.Module:
    """torchvision's ``name`` as its COCO file runs it, with random weights, statistics and class biases."""
    torch.manual_seed(0)
    model = getattr(tvd, name)(weights=None, weights_backbone=None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
                module.weight.normal_(0.7, 0.1, generator=gen)
                module.bias.normal_(0, 0.1, generator=gen)
        classes = (
            model.roi_heads.box_predictor.cls_score
            if name.startswith("faster")
            else model.head.classification_head.cls_logits
        )
        classes.bias.normal_(0, 3, generator=gen)  # scores above the thresholds: detections to compare
    if name in V1_FILES:
        _freeze_batchnorm(model.backbone.body)
    if name in EPS_ZERO:
        overwrite_eps(model, 0.0)
    model.eval()
    model.transform = NormalizeAndPad(size_divisible=32)  # no resize: both models see the same pixels
    return model


def _old_layout(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Key names before torchvision 0.13 (FPN and RPN convs without their Sequential, RetinaNet v1 heads as
    Sequential(conv, relu, ...)), as its 2019-2021 files have them."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"(fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
        key = re.sub(r"(rpn\.head\.conv)\.0\.0\.", r"\1.", key)
        if name == "retinanet_resnet50_fpn":
            key = re.sub(r"(_head\.conv)\.(\d+)\.0\.", lambda m: f"{m[1]}.{2 * int(m[2])}.", key)
        out[key] = value
    return out


def _detections(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model([image])[0]


def test_the_zoo_builds_torchvision_networks_tensor_for_tensor():
    from torchvision.models.detection import faster_rcnn, fcos, retinanet

    files = {
        "fcos_resnet50_fpn": fcos.FCOS_ResNet50_FPN_Weights,
        "retinanet_resnet50_fpn": retinanet.RetinaNet_ResNet50_FPN_Weights,
        "retinanet_resnet50_fpn_v2": retinanet.RetinaNet_ResNet50_FPN_V2_Weights,
        "fasterrcnn_resnet50_fpn": faster_rcnn.FasterRCNN_ResNet50_FPN_Weights,
        "fasterrcnn_resnet50_fpn_v2": faster_rcnn.FasterRCNN_ResNet50_FPN_V2_Weights,
    }
    assert set(TORCHVISION_ZOO) == set(files) == set(TORCHVISION_FILES)
    for name, settings in TORCHVISION_ZOO.items():
        assert files[name].COCO_V1.url.endswith("/" + TORCHVISION_FILES[name])
        with torch.device("meta"):
            theirs = getattr(tvd, name)(weights=None, weights_backbone=None)
            ours = build_detector(**torchvision_model_config(name), num_classes=90)
        counter = "num_batches_tracked"  # built without weights, torchvision has BatchNorm2d; the zoo frozen ones
        shapes = {k: v.shape for k, v in theirs.state_dict().items() if not k.endswith(counter)}
        assert {k: v.shape for k, v in ours.state_dict().items() if not k.endswith(counter)} == shapes, name
        generator = theirs.rpn.anchor_generator if name.startswith("faster") else theirs.anchor_generator
        assert [list(s) for s in generator.sizes] == settings["anchor_sizes"], name
        box = theirs.roi_heads if name.startswith("faster") else theirs
        thresholds = (box.score_thresh, box.nms_thresh, box.detections_per_img)
        assert thresholds == (settings["score_thresh"], settings["nms_thresh"], settings["detections_per_img"])
        ModelConfig.model_validate(settings)  # every entry is a valid model section
    assert set(NOT_EXPRESSIBLE) == {"fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"}


@pytest.mark.parametrize("name", list(TORCHVISION_ZOO))
def test_a_torchvision_file_gives_its_detections_and_keeps_all_but_the_class_layers(name, tmp_path, caplog):
    theirs = _published(name)
    state = theirs.state_dict()
    path = tmp_path / TORCHVISION_FILES[name]
    if name in V1_FILES:
        file_state = _old_layout(state, name)
        assert file_state.keys() != state.keys()
        theirs.load_state_dict(file_state)  # torchvision itself reads these names (its _load_from_state_dict)
        legacy = name == "fasterrcnn_resnet50_fpn"  # a pre-1.6 torch file: read without mmap
        torch.save(file_state, path, _use_new_zipfile_serialization=not legacy)
    else:
        torch.save(state, path)
    cfg = ModelConfig(**torchvision_model_config(name), weights=path)
    tensors = sum(1 for k in state if not k.endswith("num_batches_tracked"))

    with caplog.at_level(logging.INFO, logger="detkd.models"):
        ours = build_model(cfg, num_classes=90).eval()  # 91 outputs: background + 90, torchvision's COCO count
    assert caplog.messages[-1] == f"{path.name}: kept {tensors} of {tensors} tensors"
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(2))
    expected, got = _detections(theirs, image), _detections(ours, image)
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(expected[key], got[key]), key

    # three classes: the class layers are drawn as the builder draws them, every other tensor is the file's
    arch = cfg.arch
    reset = [f"{module}.{kind}" for module in CLASS_LAYERS[arch] for kind in ("weight", "bias")]
    torch.manual_seed(7)
    fresh = build_detector(**torchvision_model_config(name), num_classes=3).state_dict()
    torch.manual_seed(7)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detkd.models"):
        three = build_model(cfg, num_classes=3).state_dict()
    layers = ", ".join(CLASS_LAYERS[arch])
    assert caplog.messages == [
        f"{path.name}: kept {tensors - len(reset)} of {tensors} tensors; re-initialised {layers} (90 -> 3 classes)"
    ]
    for key, value in three.items():
        if key in reset:
            assert torch.equal(value, fresh[key]) and value.shape != state[key].shape, key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key

    if arch == "fcos":  # the same file in detkd's softplus head: bbox_reg -> bbox_reg.0
        softplus = build_model(cfg.model_copy(update={"fcos_box_activation": "softplus"}), num_classes=90)
        weight = softplus.state_dict()["head.regression_head.bbox_reg.0.weight"]
        assert torch.equal(weight, state["head.regression_head.bbox_reg.weight"])


def test_other_classes_of_a_detkd_checkpoint_and_a_multiscale_target(tmp_path, caplog):
    path = tmp_path / "teacher.pt"
    source = tiny_fcos(num_classes=2, max_level=6)
    save_detector(path, source)
    cfg = ModelConfig(arch="fcos", fpn_channels=32, min_level=3, max_level=6, weights=path)
    with caplog.at_level(logging.INFO, logger="detkd.models"):
        model = build_model(cfg, num_classes=5)
    assert caplog.messages[-1].endswith("re-initialised head.classification_head.cls_logits (2 -> 5 classes)")
    assert torch.equal(model.backbone.body.stem[0].weight, source.backbone.body.stem[0].weight)

    # an MSAD teacher (its detector spans P2-P6) from the P3-P6 file: P2's FPN blocks and the fusion stay at init
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detkd.models"):
        msad = build_model(cfg.model_copy(update={"multiscale": True, "min_level": 3}), num_classes=2)
    # 6 = P2's inner and layer conv (weight, bias) + the fusion's two fc weights
    assert caplog.messages[-1] == (
        "teacher.pt: kept 81 of 87 tensors; left at init, not in the file: 6 (detector.backbone.fpn.inner_blocks.0.0."
        "weight, detector.backbone.fpn.inner_blocks.0.0.bias, detector.backbone.fpn.layer_blocks.0.0.weight (+3 more))"
    )
    assert sum(1 for k in msad.state_dict() if k.startswith("fusion.")) == 2
    assert torch.equal(
        msad.detector.backbone.fpn.inner_blocks[1][0].weight, source.backbone.fpn.inner_blocks[0][0].weight
    )


def test_a_file_that_fits_poorly_is_refused_naming_its_first_mismatches(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_fcos(num_classes=2).state_dict(), path)
    cfg = ModelConfig(arch="fcos", backbone="resnet18", fpn_channels=32, min_level=3, max_level=6, weights=path)
    with torch.device("meta"):
        meta = build_detector_from_config(cfg, num_classes=2)
    with pytest.raises(CheckpointError) as caught:
        check_weights(meta, path)  # shapes only: a meta-device model, nothing loaded
    message = str(caught.value)
    assert message.startswith(f"{path}: does not fit the model (arch fcos, backbone resnet18): ")
    assert "first mismatches: backbone.body.conv1.weight: not in the file" in message
    assert "backbone.body.stem.0.weight: in the file, not in the model" in message
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model(cfg, num_classes=2)


def test_torchvisions_mobilenet_fpn_file_is_refused_with_the_reason_and_its_body_loads(tmp_path):
    torch.manual_seed(0)
    theirs = tvd.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    path = tmp_path / "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"
    torch.save(theirs.state_dict(), path)
    cfg = ModelConfig(arch="fasterrcnn", backbone="mobilenet_v3_large", fpn_channels=64, min_level=2, max_level=6)
    with pytest.raises(
        CheckpointError, match=r"fasterrcnn_mobilenet_v3_large_fpn .*both at stride 32.*backbone_weights"
    ):
        build_model(cfg.model_copy(update={"weights": path}), num_classes=2)
    with pytest.raises(ValueError, match="cannot be built by detkd"):
        torchvision_model_config("fasterrcnn_mobilenet_v3_large_320_fpn")
    body = build_model(cfg.model_copy(update={"backbone_weights": path}), num_classes=2).backbone.body
    assert torch.equal(body["16"][0].weight, theirs.backbone.body["16"][0].weight)


def test_a_teacher_loads_strictly_where_model_weights_leaves_a_tensor_at_init(tmp_path, caplog):
    model = tiny_fcos(num_classes=2, max_level=5)
    whole = tmp_path / "whole.pt"
    save_detector(whole, model)
    payload = load_payload(whole)
    del payload["state_dict"]["head.regression_head.bbox_ctrness.bias"]
    partial = tmp_path / "partial.pt"
    save_payload(partial, payload)
    with pytest.raises(CheckpointError, match=r"partial.pt: does not match the model: missing \['head.regression"):
        load_teacher(partial, model.detkd_config)
    with pytest.raises(CheckpointError, match="missing"):
        load_detector(partial)
    cfg = ModelConfig(arch="fcos", fpn_channels=32, min_level=3, max_level=5, weights=partial)
    with caplog.at_level(logging.INFO, logger="detkd.models"):
        build_model(cfg, num_classes=2)
    assert caplog.messages[-1].endswith("left at init, not in the file: 1 (head.regression_head.bbox_ctrness.bias)")


def test_a_checkpoint_config_from_before_these_settings_rebuilds_the_same_network(tmp_path):
    model = tiny_fcos(num_classes=2, max_level=6)
    new_keys = {
        "norm_eps",
        "top_levels",
        "fpn_norm",
        "fcos_box_activation",
        "head_norm",
        "box_loss",
        "rpn_convs",
        "box_head",
    }
    assert new_keys <= set(NETWORK_KEYS) and "trainable_layers" not in NETWORK_KEYS
    old = {k: v for k, v in model.detkd_config.items() if k not in new_keys}
    rebuilt = rebuild_detector(old)
    assert rebuilt.detkd_config == model.detkd_config
    assert "head.regression_head.bbox_reg.0.weight" in rebuilt.state_dict()  # softplus, as before
    path = tmp_path / "old.pt"
    save_payload(
        path,
        {"format": "detkd.detector/3", "model": old, "state_dict": model.state_dict(), "meta": {"name": "old"}},
    )
    loaded, _ = load_detector(path)
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        expected, got = model.eval()(image)[0], loaded(image)[0]
    assert torch.equal(expected["boxes"], got["boxes"]) and torch.equal(expected["scores"], got["scores"])
    for arch in ("retinanet", "fasterrcnn"):
        with torch.device("meta"):
            now = build_detector(arch=arch, fpn_channels=32, num_classes=2)
            before = rebuild_detector({k: v for k, v in now.detkd_config.items() if k not in new_keys})
        assert before.detkd_config == now.detkd_config
        assert {k: v.shape for k, v in before.state_dict().items()} == {k: v.shape for k, v in now.state_dict().items()}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"arch": "fcos", "head_norm": "none"}, "head_norm is a retinanet setting"),
        ({"arch": "retinanet", "fcos_box_activation": "relu"}, "fcos_box_activation is a fcos setting"),
        ({"arch": "fcos", "box_head": "conv"}, "box_head is a fasterrcnn setting"),
        ({"arch": "fasterrcnn", "top_levels": "maxpool", "max_level": 7}, "max_level 7 > 6"),
        ({"design": "lite", "fcos_box_activation": "relu"}, "design lite"),
        ({"arch": "mmdet", "mmdet_config": "m.py", "trainable_layers": 2}, "frozen_stages"),
        ({"arch": "mmdet", "mmdet_config": "m.py", "top_levels": "maxpool"}, "top_levels: not used with arch mmdet"),
    ],
)
def test_a_setting_the_arch_does_not_use_is_refused(settings, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        ModelConfig(**settings)


def test_norm_eps_reaches_every_batchnorm_of_the_body_and_swin_refuses_it():
    for backbone, norm in (("resnet18", "bn"), ("mobilenet_v3_small", "frozen_bn"), ("tiny", "frozen_bn")):
        with torch.device("meta"):
            model = build_detector(backbone=backbone, norm=norm, norm_eps=0.0, num_classes=2, fpn_channels=32)
        assert {m.eps for m in model.backbone.body.modules() if hasattr(m, "running_var")} == {0.0}, backbone
    with pytest.raises(ValueError, match="norm_eps=0.001 .* does not apply"):
        build_detector(backbone="swin_t", num_classes=2, norm_eps=0.001)
