"""MMDetection models as detkd teachers and students (``model.arch: mmdet``).

The config checks run everywhere. The rest needs the ``mmdet`` extra
(``bash scripts/install_mmdet.sh``): without it those tests are skipped, unless
``DETKD_REQUIRE_MMDET=1`` (CI sets it), which turns a missing install into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from factories import random_batch, untrained_checkpoint

from detkd.config import Config, ConfigError, validate_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs/mmdet"
RETINANET = CONFIGS / "retinanet_r18_tiny.py"
RETINANET_P2 = CONFIGS / "retinanet_r18_tiny_p2.py"
FCOS = CONFIGS / "fcos_r18_tiny.py"
FASTER_RCNN = CONFIGS / "faster_rcnn_r18_tiny.py"
SWIN = CONFIGS / "retinanet_swin_tiny.py"


@pytest.fixture(scope="module")
def mmdet():
    """Skip (or fail, with DETKD_REQUIRE_MMDET=1) when MMDetection with mmcv's ops is not installed."""
    from detkd.models.mmdet_detector import MMDetUnavailable, import_mmdet

    try:
        import_mmdet()
    except MMDetUnavailable as exc:
        if os.environ.get("DETKD_REQUIRE_MMDET") == "1":
            pytest.fail(f"DETKD_REQUIRE_MMDET=1 but {exc}")
        pytest.skip(str(exc))


def _model_section(**model) -> dict:
    return {"name": "m", "model": model}


def test_arch_mmdet_config_is_checked_without_mmdet_installed():
    with pytest.raises(ConfigError, match="arch mmdet needs mmdet_config"):
        validate_config(_model_section(arch="mmdet"), source="x.yaml")
    with pytest.raises(ConfigError, match="fpn_channels: not used with arch mmdet"):
        validate_config(_model_section(arch="mmdet", mmdet_config="c.py", fpn_channels=32), source="x.yaml")
    with pytest.raises(ConfigError, match="multi-scale teacher wraps detkd's torchvision detectors only"):
        validate_config(_model_section(arch="mmdet", mmdet_config="c.py", multiscale=True), source="x.yaml")
    with pytest.raises(ConfigError, match="mmdet_config is only read with arch mmdet"):
        validate_config(_model_section(arch="fcos", mmdet_config="c.py"), source="x.yaml")
    # the plain defaults round-trip (absolute paths, plans) without tripping the torchvision-keys check
    cfg = validate_config(_model_section(arch="mmdet", mmdet_config="c.py"), source="x.yaml")
    assert Config.model_validate(cfg.model_dump()).model.mmdet_config == Path("c.py")


def _build(config: Path, num_classes: int | None = 3):
    from detkd.models.mmdet_detector import build_mmdet_detector, read_mmdet_config

    return build_mmdet_detector(
        mmdet_config=read_mmdet_config(config), num_classes=num_classes, config_file=str(config)
    )


def _batch(size: int = 64, n: int = 2):
    targets = [([[4.0, 6.0, 30.0, 28.0]], [1]), ([[20.0, 16.0, 50.0, 60.0], [2.0, 2.0, 14.0, 12.0]], [3, 2])][:n]
    return random_batch(targets, size=size, scale=size / 64)


@pytest.mark.mmdet
def test_mmdet_detector_speaks_detkds_interface(mmdet):
    from detkd.models import DetectorTaps, has_dense_logits, pyramid_strides
    from detkd.models.taps import extract_features

    model = _build(RETINANET)
    assert pyramid_strides(model) == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    assert has_dense_logits(model) and model.num_anchors == 9
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_bbox"} and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())

    model.eval()
    with torch.no_grad(), DetectorTaps(model) as taps:
        detections = model(images)
    features = extract_features(model, images)
    assert list(taps.pyramid) == list(features.pyramid) == ["p3", "p4", "p5", "p6", "p7"]
    for level in taps.pyramid:
        assert torch.equal(taps.pyramid[level], features.pyramid[level])
        assert torch.equal(taps.class_logits[level], features.class_logits[level])
    # K classes per anchor, no background slot; 64 px padded to the coarsest stride, 128: P3 is 16 x 16
    assert features.class_logits["p3"].shape == (2, 9 * 3, 16, 16)
    for det in detections:
        assert set(det) == {"boxes", "scores", "labels"}
        assert det["labels"].numel() == 0 or 1 <= int(det["labels"].min()) and int(det["labels"].max()) <= 3

    # the config's preprocessing: 0-255 scale, ImageNet mean/std, RGB (bgr_to_rgb=True), zero padding
    batch, sizes = model.prepare([torch.full((3, 40, 50), 0.5)])
    assert sizes == [(40, 50)] and batch.shape == (1, 3, 128, 128)
    expected = (127.5 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    assert torch.allclose(batch[0, :, 0, 0], expected) and float(batch[0, :, 40:, :].abs().max()) == 0.0


@pytest.mark.mmdet
def test_two_stage_mmdet_detector_trains_and_predicts(mmdet):
    from detkd.models import has_dense_logits, pyramid_strides

    model = _build(FASTER_RCNN)
    assert pyramid_strides(model) == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert not has_dense_logits(model)
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"} == set(losses)  # `acc` is not a loss
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


ATSS_HEAD = """dict(
        type='ATSSHead', num_classes=3, in_channels=64, stacked_convs=2, feat_channels=64,
        anchor_generator=dict(type='AnchorGenerator', ratios=[1.0], octave_base_scale=4, scales_per_octave=1,
                              strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0))"""
GFL_HEAD = """dict(
        type='GFLHead', num_classes=3, in_channels=64, stacked_convs=2, feat_channels=64,
        anchor_generator=dict(type='AnchorGenerator', ratios=[1.0], octave_base_scale=4, scales_per_octave=1,
                              strides=[8, 16, 32, 64, 128]),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_dfl=dict(type='DistributionFocalLoss', loss_weight=0.25),
        reg_max=16,
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0))"""


@pytest.mark.mmdet
@pytest.mark.parametrize(
    ("name", "head", "terms"),
    [
        ("ATSS", ATSS_HEAD, {"loss_cls", "loss_bbox", "loss_centerness"}),
        ("GFL", GFL_HEAD, {"loss_cls", "loss_bbox", "loss_dfl"}),
    ],
)
def test_other_single_stage_heads_work_through_the_same_adapter(mmdet, tmp_path, name, head, terms):
    from detkd.models import has_dense_logits
    from detkd.models.taps import extract_features

    text = RETINANET.read_text().replace("type='RetinaNet'", f"type='{name}'")
    start = text.index("    bbox_head=dict(")
    end = text.index("    train_cfg=dict(")
    text = text[:start] + f"    bbox_head={head},\n" + text[end:]
    text = text.replace(
        "assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1)",
        "assigner=dict(type='ATSSAssigner', topk=9)",
    )
    assert "ATSSAssigner" in text and "RetinaHead" not in text
    config = tmp_path / f"{name.lower()}_tiny.py"
    config.write_text(text)
    model = _build(config)
    assert has_dense_logits(model) and model.num_anchors == 1
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == terms and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    assert extract_features(model, images).class_logits["p3"].shape == (2, 3, 16, 16)
    with torch.no_grad():
        assert len(model(images)) == 2


def _distill_step(student, teacher, *, student_scale: float, method: str, settings: dict | None = None):
    from detkd.distill.distiller import Distiller, Teacher

    distiller = Distiller(
        student=student,
        student_scale=student_scale,
        teachers=[Teacher(teacher, 1.0)],
        methods={method: dict(settings or {})},
        teacher_bf16=False,
    )
    distiller.train()
    images, targets = _batch(64)
    losses = distiller(images, targets)
    kd = {k: v for k, v in losses.items() if k.startswith("kd_")}
    assert kd and all(torch.isfinite(v) for v in kd.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # frozen, outside the module tree
    return distiller, kd


def _torchvision(arch: str, *, min_level: int, max_level: int, backbone: str = "tiny"):
    from detkd.models import build_detector

    torch.manual_seed(1)
    return build_detector(
        arch=arch, backbone=backbone, num_classes=3, min_level=min_level, max_level=max_level, fpn_channels=32
    )


@pytest.mark.mmdet
@pytest.mark.parametrize("method", ["mse", "ssim", "mgd", "msad"])
def test_feature_methods_across_frameworks_with_the_pyramid_shift(mmdet, method):
    # an MMDetection teacher (P3-P7 at 64 px) distils a half-resolution torchvision student (P2-P6 at 32 px)
    distiller, _ = _distill_step(
        _torchvision("fcos", min_level=2, max_level=6), _build(RETINANET), student_scale=0.5, method=method
    )
    assert distiller.pairs[method] == [(f"p{k}", f"p{k + 1}") for k in range(2, 7)]
    # ... and a torchvision teacher distils a half-resolution MMDetection student (P2-P6 config)
    distiller, _ = _distill_step(
        _build(RETINANET_P2), _torchvision("retinanet", min_level=3, max_level=7), student_scale=0.5, method=method
    )
    assert distiller.pairs[method] == [(f"p{k}", f"p{k + 1}") for k in range(2, 7)]


@pytest.mark.mmdet
def test_logit_distillation_across_frameworks_compares_the_real_classes(mmdet):
    # DSAMKD's logit branch: torchvision FCOS has K + 1 logits (background slot 0), MMDetection's FCOS K.
    teacher = _build(FCOS)
    student = _torchvision("fcos", min_level=3, max_level=7)
    distiller, kd = _distill_step(student, teacher, student_scale=1.0, method="dsamkd")
    assert distiller.logit_slots["dsamkd"] == (1, 0)  # drop the student's background slot, keep the teacher's
    assert any("logit" in k for k in kd)
    distiller, _ = _distill_step(
        _build(FCOS), _torchvision("fcos", min_level=3, max_level=7), student_scale=1.0, method="dsamkd"
    )
    assert distiller.logit_slots["dsamkd"] == (0, 1)


@pytest.mark.mmdet
@pytest.mark.parametrize("teacher", ["mmdet_swin", "torchvision_swin_t"])
def test_swin_teachers_distil_a_cnn_student(mmdet, teacher, tmp_path):
    if teacher == "mmdet_swin":
        model = _build(SWIN)
    else:
        from torchvision.models import swin_t

        from detkd.models.checkpoint import load_backbone_weights

        model = _torchvision("fcos", min_level=3, max_level=7, backbone="swin_t")
        classifier = swin_t(weights=None)  # stands in for an ImageNet file: local weights only
        torch.save(classifier.state_dict(), tmp_path / "swin_t.pth")
        load_backbone_weights(model, tmp_path / "swin_t.pth", backbone="swin_t")
        assert torch.equal(
            model.backbone.body.features[1][0].attn.qkv.weight, classifier.features[1][0].attn.qkv.weight
        )
    _distill_step(_torchvision("fcos", min_level=2, max_level=6), model, student_scale=0.5, method="ssim")


@pytest.mark.mmdet
def test_an_mmdet_model_has_a_cost_and_says_why_it_has_no_deployed_speed(mmdet, tmp_path, tiny_dataset, tiny_config):
    from detkd.models.cost import checkpoint_cost
    from detkd.serving.speed import SpeedSettings, SpeedUnavailable, measure_speed, split_images

    data = tiny_config(tiny_dataset, tmp_path)
    data["model"] = {"arch": "mmdet", "mmdet_config": str(RETINANET)}
    path = untrained_checkpoint(data, tmp_path / "retina.pt")
    cost = checkpoint_cost(path)
    assert cost.mflops > 100 and cost.params > 1_000_000 and cost.input_px == 64  # ResNet-18 RetinaNet at 64 px
    images = split_images(validate_config(data, source="test").data.val, count=1)
    with pytest.raises(SpeedUnavailable, match="an MMDetection model"):
        measure_speed(path, path, images, settings=SpeedSettings(turns=1, calls=1))


@pytest.mark.mmdet
def test_the_run_digest_follows_the_resolved_config_base_files_included(mmdet, tmp_path, tiny_dataset, tiny_config):
    from detkd.engine.plan import config_digest

    base, child = tmp_path / "base.py", tmp_path / "child.py"
    base.write_text(RETINANET.read_text())
    child.write_text("_base_ = './base.py'\n")
    data = tiny_config(tiny_dataset, tmp_path)
    data["model"] = {"arch": "mmdet", "mmdet_config": str(child)}

    def digest() -> str:
        return config_digest(Config.model_validate(data), ())

    first = digest()
    child.write_text("# the same model, reworded\n_base_ = './base.py'\n")
    assert digest() == first
    base.write_text(RETINANET.read_text().replace("stacked_convs=2", "stacked_convs=1"))
    assert digest() != first  # a change in the base file is a different run
    child.unlink()
    with pytest.raises(ConfigError, match="model.mmdet_config: .*child.py: MMDetection config file not found"):
        digest()


@pytest.mark.mmdet
def test_mmdetection_checkpoint_loads_as_a_teacher_and_a_mismatch_names_both_files(
    mmdet, tmp_path, tiny_dataset, tiny_config
):
    from mmengine.runner import save_checkpoint

    from detkd.engine.build import build_trainable
    from detkd.engine.plan import build_plan
    from detkd.records import TrackingContext

    zoo = _build(RETINANET, num_classes=None).mm  # as MMDetection's Runner saves it: meta + state_dict
    save_checkpoint(
        {"meta": {"epoch": 12, "dataset_meta": {"classes": ("a", "b", "c")}}, "state_dict": zoo.state_dict()},
        str(tmp_path / "retina_zoo.pth"),
    )
    tracking = TrackingContext(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="detkd")

    def student_config(teacher_config: Path, checkpoint: Path) -> Config:
        data = tiny_config(tiny_dataset, tmp_path, input={"scale": 0.5}, model={"min_level": 2, "max_level": 5})
        data["distill"] = {
            "teachers": [{"source": str(checkpoint), "mmdet_config": str(teacher_config)}],
            "ssim": {},
        }
        return Config.model_validate(data)

    plan = build_plan(student_config(RETINANET, tmp_path / "retina_zoo.pth"), tracking=tracking)
    spec = plan.teachers[0]
    assert spec.model["arch"] == "mmdet" and spec.scale == 1.0 and spec.name == "retina_zoo"
    distiller, _ = build_trainable(plan)
    teacher = distiller.teachers[0].model
    assert all(torch.equal(teacher.mm.state_dict()[k], v) for k, v in zoo.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())

    # the FCOS config's network cannot take RetinaNet weights: the error names both files
    with pytest.raises(ConfigError) as err:
        build_plan(student_config(FCOS, tmp_path / "retina_zoo.pth"), tracking=tracking)
    assert "retina_zoo.pth" in str(err.value) and "fcos_r18_tiny.py" in str(err.value)
    # a config for another label space is refused, naming the config
    other = tmp_path / "retina_80.py"
    other.write_text(RETINANET.read_text().replace("num_classes=3", "num_classes=80"))
    with pytest.raises(ConfigError, match="retina_80.py predicts 80 classes, the training data has 3"):
        build_plan(student_config(other, tmp_path / "retina_zoo.pth"), tracking=tracking)
    # a full training checkpoint pickling Python objects is refused with the way out
    torch.save({"state_dict": zoo.state_dict(), "message_hub": _Pickled()}, tmp_path / "full.pth")
    with pytest.raises(ConfigError, match="publish_model.py"):
        build_plan(student_config(RETINANET, tmp_path / "full.pth"), tracking=tracking)


class _Pickled:
    """Any Python object in a checkpoint: weights_only loading refuses it."""


@pytest.mark.slow
@pytest.mark.mmdet
@pytest.mark.ray
def test_train_an_mmdet_retinanet_distil_it_into_a_detkd_student_and_evaluate_both(
    mmdet, tmp_path, tiny_dataset, tiny_config, ray_cluster
):
    from typer.testing import CliRunner

    from detkd.cli import app
    from detkd.data import open_source
    from detkd.engine.evaluate import evaluate_checkpoint
    from detkd.engine.launch import run_training
    from detkd.models.checkpoint import load_payload
    from detkd.records import TrackingContext

    tracking = TrackingContext(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="detkd")
    teacher_cfg = tiny_config(
        tiny_dataset, tmp_path, train={"epochs": 3}, optim={"lr": 0.004}, tracking={"log_model": False}
    )
    teacher_cfg["name"] = "mm_teacher"
    teacher_cfg["model"] = {"arch": "mmdet", "mmdet_config": str(RETINANET)}
    teacher = run_training(Config.model_validate(teacher_cfg), tracking=tracking)
    payload = load_payload(teacher.model_path)
    assert payload["model"]["arch"] == "mmdet" and payload["model"]["num_classes"] == 3
    assert all(k.startswith("mm.") for k in payload["state_dict"])

    student_cfg = tiny_config(
        tiny_dataset,
        tmp_path,
        input={"scale": 0.5},
        model={"min_level": 2, "max_level": 6},
        train={"epochs": 2},
        tracking={"log_model": False},
        distill={"teachers": [{"source": str(teacher.model_path)}], "ssim": {"weight": 3.0}},
    )
    student_cfg["name"], student_cfg["role"] = "tv_student", "student"
    student = run_training(Config.model_validate(student_cfg), tracking=tracking)
    assert student.method == "ssim" and load_payload(student.model_path)["model"]["arch"] == "fcos"

    val = open_source(coco=tiny_dataset / "annotations/instances_val.json", images=tiny_dataset / "images/val")
    for outcome in (teacher, student):
        evaluation = evaluate_checkpoint(outcome.model_path, val)
        assert 0.0 <= evaluation.metrics["AP"] <= 1.0
        assert evaluation.metrics["AP"] == pytest.approx(outcome.metrics["val/AP"], abs=1e-9)
    assert evaluate_checkpoint(teacher.model_path, val).metrics["AP"] > 0.0  # it learned something

    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(teacher.model_path),
            "--coco",
            str(tiny_dataset / "annotations/instances_val.json"),
            "--images",
            str(tiny_dataset / "images/val"),
        ],
    )
    assert result.exit_code == 0, result.output
    exported = CliRunner().invoke(
        app, ["export", str(teacher.model_path), "--format", "onnx", "--out", str(tmp_path / "t.onnx")]
    )
    assert exported.exit_code != 0 and "MMDeploy" in exported.output and not (tmp_path / "t.onnx").exists()


@pytest.mark.mmdet
@pytest.mark.parametrize(
    ("config", "layers"),
    [
        (RETINANET, "mm.bbox_head.retina_cls"),
        (FASTER_RCNN, "mm.roi_head.bbox_head.fc_cls, mm.roi_head.bbox_head.fc_reg"),
    ],
)
def test_an_mmdetection_zoo_file_of_other_classes_keeps_all_but_its_class_layers(
    mmdet, tmp_path, caplog, config, layers
):
    import logging

    from mmengine.runner import save_checkpoint

    from detkd.config import ModelConfig
    from detkd.models import build_model

    torch.manual_seed(0)
    zoo = _build(config, num_classes=80).mm.state_dict()
    path = tmp_path / "zoo.pth"
    save_checkpoint({"meta": {"epoch": 12}, "state_dict": zoo}, str(path))
    cfg = ModelConfig(arch="mmdet", mmdet_config=config, weights=path)
    torch.manual_seed(3)
    fresh = build_model(cfg.model_copy(update={"weights": None}), num_classes=3).state_dict()
    torch.manual_seed(3)
    with caplog.at_level(logging.INFO, logger="detkd.models"):
        model = build_model(cfg, num_classes=3)
    reset = [k for k in fresh if k.rsplit(".", 1)[0] in layers.split(", ")]
    tensors = len([k for k in zoo if not k.endswith("num_batches_tracked")])
    assert (
        caplog.messages[-1]
        == f"zoo.pth: kept {tensors - len(reset)} of {tensors} tensors; re-initialised {layers} (80 -> 3 classes)"
    )
    for key, value in model.state_dict().items():
        expected = fresh[key] if key in reset else zoo[key.removeprefix("mm.")]
        assert torch.equal(value, expected), key
