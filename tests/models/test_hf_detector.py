"""Hugging Face transformers detectors (model.arch: hf) built from the shipped tiny configs: train, predict,
score, taps, checkpoints and save_pretrained folders (real transformers models on CPU, no Hub).

Skipped without the ``hf`` extra, unless ``DETKD_REQUIRE_HF=1`` (CI sets it), which makes that a failure."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from factories import require_hf

require_hf()  # before anything imports transformers
import transformers  # noqa: E402

from detkd.config import ConfigError, validate_config  # noqa: E402
from detkd.models import build_model, load_detector, save_detector  # noqa: E402
from detkd.models.checkpoint import CheckpointError, load_teacher, read_checkpoint_meta  # noqa: E402
from detkd.models.detectors import pyramid_strides  # noqa: E402
from detkd.models.hf_detector import HFDetector, fit_hf_weights, read_hf_config  # noqa: E402
from detkd.models.taps import DetectorTaps, extract_features, has_dense_logits  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs/hf"
ARCHS = ["rtdetr_tiny", "rtdetr_v2_tiny", "dfine_tiny", "deformable_detr_tiny", "detr_tiny"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub call would fail instead of hanging on this network


def hf_config(tiny_dataset, tiny_config, work: Path, folder: Path, **model) -> dict:
    config = tiny_config(tiny_dataset, work)
    config["model"] = {"arch": "hf", "hf_model": str(folder), **model}  # none of the torchvision network keys
    return config


def batch(sizes=((64, 64), (48, 56))):
    images = [torch.rand(3, h, w) for h, w in sizes]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 44.0, 30.0]]), "labels": torch.tensor([1, 3])}
        for _ in sizes
    ]
    return images, targets


def expected_strides(name: str) -> list[int]:
    config = read_hf_config(CONFIGS / name)
    if "feat_strides" in config:
        return config["feat_strides"]
    if config["model_type"] == "detr":
        return [32]  # the backbone's last stage (ResNet stage4)
    levels = config["num_feature_levels"]
    return [8, 16, 32, 64][:levels]  # ResNet stages 2-4, then stride-2 levels above them


@pytest.mark.parametrize("name", ARCHS)
def test_each_architecture_builds_trains_predicts_and_is_scored(name, tiny_dataset, tiny_config, tmp_path):
    from detkd.engine.evaluate import evaluate_checkpoint
    from detkd.engine.plan import build_plan, open_split
    from detkd.records import TrackingContext

    cfg = validate_config(hf_config(tiny_dataset, tiny_config, tmp_path, CONFIGS / name), source="test")
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=3)
    assert isinstance(model, HFDetector) and not has_dense_logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert losses and all(torch.isfinite(v) for v in losses.values())
    assert {"bbox", "giou"} <= set(losses)  # the model's own Hungarian-matched box terms (train/loss_bbox, ...)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    model.eval()
    model.set_thresholds(score_thresh=0.0, detections_per_img=7)
    with torch.no_grad():
        detections = model(images)
    for (h, w), det in zip(((64, 64), (48, 56)), detections, strict=True):
        assert det["boxes"].shape[1:] == (4,) and 0 < len(det["boxes"]) <= 7
        assert det["boxes"][:, 0::2].max() <= w and det["boxes"][:, 1::2].max() <= h and det["boxes"].min() >= 0
        assert det["labels"].min() >= 1 and det["labels"].max() <= 3  # detkd's labels: 1..K
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])

    plan = build_plan(cfg, tracking=TrackingContext(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="detkd"))
    path = tmp_path / "model.pt"
    save_detector(path, model, meta={"plan": plan.to_dict()})
    result = evaluate_checkpoint(path, open_split(cfg.data.val, skip_invalid=False), batch_size=4, score_thresh=0.0)
    assert 0.0 <= result.metrics["AP"] <= 1.0 and "AP50" in result.metrics  # detkd's COCO evaluator scored it


@pytest.mark.parametrize("name", ARCHS)
def test_the_taps_are_the_encoders_maps_at_the_strides_the_config_implies(name):
    from detkd.models.hf_detector import build_hf_detector

    model = build_hf_detector(hf_config=read_hf_config(CONFIGS / name), num_classes=3, source=str(CONFIGS / name))
    strides = expected_strides(name)
    assert pyramid_strides(model) == {f"p{int(math.log2(s))}": s for s in strides}
    images, targets = batch(sizes=((70, 90), (45, 61)))  # odd sizes: the batch is padded to the coarsest stride
    padded = [math.ceil(90 / model.size_divisible) * model.size_divisible]
    model.train()
    with DetectorTaps(model) as taps:
        model(images, targets)
    assert list(taps.pyramid) == list(pyramid_strides(model)) and not taps.has_logits
    for level, stride in zip(taps.pyramid.values(), strides, strict=True):
        assert level.shape[1] == model.out_channels and level.shape[-1] == padded[0] // stride
    model.eval()
    with torch.no_grad():
        features = extract_features(model, images)
    assert features.class_logits is None
    assert [f.shape for f in features.pyramid.values()] == [f.shape for f in taps.pyramid.values()]
    with torch.device("meta"):  # how a plan checks a model before any worker starts
        on_meta = build_hf_detector(hf_config=read_hf_config(CONFIGS / name), num_classes=3)
    assert pyramid_strides(on_meta) == pyramid_strides(model)


def saved_folder(tmp_path: Path, name: str = "rtdetr_tiny", *, classes: int = 3, **changes) -> tuple[Path, HFDetector]:
    """A save_pretrained folder of a model built from a shipped config (what a user downloads or fine-tunes)."""
    from detkd.models.hf_detector import build_hf_detector

    config = {**read_hf_config(CONFIGS / name), **changes}
    torch.manual_seed(1)
    model = build_hf_detector(hf_config=config, num_classes=classes)
    folder = tmp_path / f"{name}_{classes}_{abs(hash(json.dumps(changes, sort_keys=True))) % 1000}"
    model.hf.save_pretrained(folder)
    return folder, model


def test_a_save_pretrained_folder_loads_as_a_teacher_and_its_checkpoint_rebuilds_without_it(tmp_path):
    folder, original = saved_folder(tmp_path)
    config = read_hf_config(folder)
    teacher = load_teacher(folder, dict(arch="hf", num_classes=3, hf_config=config, source=str(folder)))
    images, _ = batch()
    original.eval()
    with torch.no_grad():
        want = original(images)
        got = teacher(images)
    assert not teacher.training
    for a, b in zip(want, got, strict=True):
        assert torch.allclose(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    path = tmp_path / "teacher.pt"
    save_detector(path, teacher)
    shutil.rmtree(folder)  # the checkpoint holds the transformers config: it rebuilds without the folder
    stored = read_checkpoint_meta(path).model
    assert stored["arch"] == "hf" and stored["hf_config"]["model_type"] == "rt_detr" and stored["num_classes"] == 3
    rebuilt, _ = load_detector(path)
    with torch.no_grad():
        again = rebuilt.eval()(images)
    assert all(torch.allclose(a["scores"], b["scores"]) for a, b in zip(want, again, strict=True))


def test_a_folder_of_another_network_is_refused_naming_both(tmp_path):
    folder, _ = saved_folder(tmp_path, encoder_hidden_dim=48, decoder_in_channels=[48, 48, 48])  # weights: 48 wide
    shutil.copy(CONFIGS / "rtdetr_tiny/config.json", folder / "config.json")  # ...beside the 32-wide config
    model_config = dict(arch="hf", num_classes=3, hf_config=read_hf_config(folder), source=str(folder))
    with pytest.raises(CheckpointError) as refused:
        load_teacher(folder, model_config)
    message = str(refused.value)
    assert str(folder) in message and "rt_detr" in message and "another shape" in message


def test_fine_tuning_on_other_classes_reinitialises_the_class_layers_only(tmp_path, tiny_dataset, tiny_config):
    folder, original = saved_folder(tmp_path, classes=5)
    cfg = validate_config(hf_config(tiny_dataset, tiny_config, tmp_path, folder), source="test")
    model = build_model(cfg.model, num_classes=3)  # the user's 3 classes
    fit = fit_hf_weights(model, folder, strict=False)
    assert fit.reinitialised and all("class" in k or "score" in k for k in fit.reinitialised), fit.reinitialised
    kept = [k for k in original.hf.state_dict() if k not in fit.reinitialised]
    own, theirs = model.hf.state_dict(), original.hf.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in kept)  # everything else is the folder's
    with pytest.raises(ValueError, match="do not fit"):  # a teacher must fit whole
        fit_hf_weights(model, folder, strict=True)


def test_config_errors_name_the_key(tiny_dataset, tiny_config, tmp_path):
    config = hf_config(tiny_dataset, tiny_config, tmp_path, CONFIGS / "detr_tiny")
    del config["model"]["hf_model"]
    with pytest.raises(ConfigError, match="arch hf needs hf_model"):
        validate_config(config, source="test")
    with pytest.raises(ConfigError, match="fpn_channels: not used with arch hf"):
        validate_config(
            hf_config(tiny_dataset, tiny_config, tmp_path, CONFIGS / "detr_tiny", fpn_channels=32), source="test"
        )
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not a detector detkd wraps"):
        read_hf_config(bad)
    fcos = tiny_config(tiny_dataset, tmp_path)
    fcos["model"]["hf_canvas"] = 128
    with pytest.raises(ConfigError, match="hf_canvas is only read with arch hf"):
        validate_config(fcos, source="test")


def test_an_rtdetr_pads_every_batch_to_its_canvas_so_an_image_gets_the_same_detections_in_any_batch():
    """RT-DETR's positions ignore the mask: padded to the batch, an image's detections changed with its batch
    mates; padded to the canvas they do not. An image larger than the canvas widens the batch."""
    from detkd.models.hf_detector import build_hf_detector

    torch.manual_seed(0)
    model = build_hf_detector(hf_config=read_hf_config(CONFIGS / "rtdetr_tiny"), num_classes=3, canvas=100).eval()
    assert model.canvas_side == 128  # rounded up to the coarsest stride
    small, large = torch.rand(3, 40, 60), torch.rand(3, 96, 128)
    assert model.prepare([small])[0].shape[-2:] == (128, 128)
    assert model.prepare([small, torch.rand(3, 64, 160)])[0].shape[-2:] == (128, 160)
    model.set_thresholds(score_thresh=0.0, detections_per_img=100)
    with torch.no_grad():
        alone, beside = model([small])[0], model([small, large])[0]
    assert torch.equal(alone["labels"], beside["labels"])
    assert torch.allclose(alone["boxes"], beside["boxes"], atol=1e-4)
    model.canvas = None  # as before the canvas: the batch's own size, so the large mate changes the frame
    with torch.no_grad():
        alone, beside = model([small])[0], model([small, large])[0]
    assert not torch.allclose(alone["boxes"], beside["boxes"], atol=1e-4)


def test_the_canvas_enters_the_digest_only_when_set(tiny_dataset, tiny_config, tmp_path):
    """Unset, the canvas follows the input view (already in the digest): configs from before it keep their digest."""
    from detkd.engine.plan import config_digest

    config = hf_config(tiny_dataset, tiny_config, tmp_path, CONFIGS / "detr_tiny")
    unset = validate_config(config, source="test")
    assert unset.model.hf_canvas is None  # filled in when the run is built (engine.build.resolved_model)
    digests = {config_digest(unset, ())}
    for canvas in (64, 128):
        config["model"]["hf_canvas"] = canvas
        digests.add(config_digest(validate_config(config, source="test"), ()))
    assert len(digests) == 3


def distill_config(tiny_dataset, tiny_config, work: Path, teacher: Path, **methods) -> dict:
    config = tiny_config(tiny_dataset, work)
    config["distill"] = {"teachers": [{"source": str(teacher)}], **methods}
    return config


def plan_of(config: dict, work: Path):
    from detkd.engine.plan import build_plan
    from detkd.records import TrackingContext

    cfg = validate_config(config, source="test")
    return build_plan(cfg, tracking=TrackingContext(uri=f"sqlite:///{work / 'mlflow.db'}", experiment="detkd"))


def test_a_transformer_teacher_pairs_its_encoder_levels_and_a_logit_loss_is_refused_at_plan_time(
    tmp_path, tiny_dataset, tiny_config
):
    folder, _ = saved_folder(tmp_path)  # an RT-DETR teaching the tiny FCOS student (3 classes)
    plan = plan_of(distill_config(tiny_dataset, tiny_config, tmp_path, folder, ssim={"weight": 3.0}), tmp_path)
    (teacher,) = plan.teachers
    assert teacher.model["arch"] == "hf" and teacher.path == str(folder.resolve()) and teacher.scale == 1.0
    with pytest.raises(ConfigError) as refused:
        plan_of(distill_config(tiny_dataset, tiny_config, tmp_path, folder, dsamkd={"logit_weight": 1.0}), tmp_path)
    message = str(refused.value)
    assert "dsamkd" in message and "teacher 0 has no dense logits" in message and "object queries" in message
    assert "logit_weight=0" in message
    plan_of(distill_config(tiny_dataset, tiny_config, tmp_path, folder, dsamkd={"logit_weight": 0.0}), tmp_path)


def test_a_teacher_folder_of_other_classes_or_without_weights_is_refused_naming_it(tmp_path, tiny_dataset, tiny_config):
    five, _ = saved_folder(tmp_path, classes=5)
    with pytest.raises(ConfigError, match=rf"{five.name} predicts 5 classes, the training data has 3"):
        plan_of(distill_config(tiny_dataset, tiny_config, tmp_path, five, ssim={"weight": 3.0}), tmp_path)
    bare = tmp_path / "config_only"
    bare.mkdir()
    shutil.copy(CONFIGS / "rtdetr_tiny/config.json", bare / "config.json")
    with pytest.raises(ConfigError, match="no model.safetensors; a teacher needs trained weights"):
        plan_of(distill_config(tiny_dataset, tiny_config, tmp_path, bare, ssim={"weight": 3.0}), tmp_path)


@pytest.mark.slow
@pytest.mark.ray
def test_train_an_rtdetr_distil_it_from_its_folder_into_a_torchvision_student_and_evaluate_both(
    tmp_path, tiny_dataset, tiny_config, ray_cluster
):
    """Ray Train end to end: an RT-DETR trained on the tiny data with its own loss, saved as a save_pretrained
    folder (what a user brings), teaching a half-resolution FCOS through its encoder's maps with SSIM."""
    from detkd.data import open_source
    from detkd.engine.evaluate import evaluate_checkpoint
    from detkd.engine.launch import run_training
    from detkd.models.checkpoint import load_payload
    from detkd.records import TrackingContext

    tracking = TrackingContext(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="detkd")
    teacher_cfg = hf_config(tiny_dataset, tiny_config, tmp_path, CONFIGS / "rtdetr_tiny")
    teacher_cfg.update(name="rtdetr_teacher", train={"epochs": 4}, tracking={"log_model": False})
    teacher_cfg["optim"] = {"lr": 0.002}
    teacher = run_training(validate_config(teacher_cfg, source="test"), tracking=tracking)
    payload = load_payload(teacher.model_path)
    assert payload["model"]["arch"] == "hf" and payload["model"]["hf_config"]["model_type"] == "rt_detr"
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(tracking.uri).get_run(teacher.run_id).data.metrics
    assert {"train/loss_vfl", "train/loss_bbox", "train/loss_giou"} <= set(logged)  # its own loss, term by term

    folder = tmp_path / "rtdetr_folder"
    load_detector(teacher.model_path)[0].hf.save_pretrained(folder)
    student_cfg = tiny_config(
        tiny_dataset,
        tmp_path,
        input={"scale": 0.5},
        model={"min_level": 2, "max_level": 6},
        train={"epochs": 2},
        tracking={"log_model": False},
        distill={"teachers": [{"source": str(folder)}], "ssim": {"weight": 3.0}},
    )
    student_cfg["name"], student_cfg["role"] = "tv_student", "student"
    student = run_training(validate_config(student_cfg, source="test"), tracking=tracking)
    assert student.method == "ssim" and load_payload(student.model_path)["model"]["arch"] == "fcos"
    student_logged = MlflowClient(tracking.uri).get_run(student.run_id).data.metrics
    assert [v for k, v in student_logged.items() if k.startswith("train/") and k.endswith("kd_ssim")][0] > 0

    val = open_source(coco=tiny_dataset / "annotations/instances_val.json", images=tiny_dataset / "images/val")
    for outcome in (teacher, student):
        evaluation = evaluate_checkpoint(outcome.model_path, val)
        assert 0.0 <= evaluation.metrics["AP"] <= 1.0
        assert evaluation.metrics["AP"] == pytest.approx(outcome.metrics["val/AP"], abs=1e-9)


@pytest.mark.parametrize("name", ["deformable_detr_tiny", "detr_tiny"])  # no top-k query selection (see below)
def test_export_writes_a_canvas_graph_that_predicts_as_eager_pytorch_at_any_size_inside_it(
    name, tmp_path, tiny_dataset, tiny_config
):
    """The graph runs the network at the fixed canvas and pads inside itself: images of other sizes than the
    probe get eager PyTorch's detections; one over the canvas is refused, not answered wrong."""
    pytest.importorskip("onnxruntime")
    from factories import untrained_checkpoint

    from detkd.serving.export import ExportError, export_detector, read_info
    from detkd.serving.predictor import Predictor

    # a 128 px canvas for 64 px images: Deformable DETR's stride-64 level would be 1x1 on 64 px, which
    # GroupNorm refuses when traced
    config = hf_config(tiny_dataset, tiny_config, tmp_path, CONFIGS / name, hf_canvas=128)
    path = untrained_checkpoint(config, tmp_path / "m.pt")
    assert load_detector(path)[0].canvas_side == 128
    result = export_detector(path, format="onnx", out=tmp_path / "m.onnx", score_thresh=0.0)
    assert result.max_box_difference_px <= 0.01 and read_info(result.path)["canvas"] == 128
    assert result.probe_images == 2  # the canvas and a smaller non-square image
    exported = Predictor.from_export(result.path, score_thresh=0.0)
    eager = Predictor.from_checkpoint(path, score_thresh=0.0)
    generator = torch.Generator().manual_seed(3)
    for height, width in [(64, 64), (48, 80), (64, 40)]:  # prepared: 64x64, 64x107, 102x64
        image = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
        got, expected = exported([image])[0], eager([image])[0]
        assert len(got.boxes) == len(expected.boxes) > 0 and got.category_ids == expected.category_ids
        corners = zip(sum(got.boxes, []), sum(expected.boxes, []), strict=True)
        assert max(abs(a - b) for a, b in corners) <= 0.02
    with pytest.raises(ValueError, match=r"runs on a 128x128 canvas; the image is 160x64 px"):
        exported([(torch.rand(64, 160, 3) * 255).to(torch.uint8).numpy()])
    with pytest.raises(ExportError, match="exports to ONNX only"):
        export_detector(path, format="torchscript", out=tmp_path / "m.ts")
    assert not (tmp_path / "m.ts").exists()


def test_an_untrained_rtdetr_is_refused_for_its_tied_queries_and_one_without_a_canvas_saying_why(
    tmp_path, tiny_dataset, tiny_config
):
    """RT-DETR's graph is the canvas graph above; an untrained one picks its queries from cells it scores alike,
    which ONNX Runtime's top-k orders otherwise than PyTorch's: the check refuses it with that reason. (A trained
    one exports: the test below, and benchmarks/results/transformer_export.md.)"""
    pytest.importorskip("onnxruntime")
    from factories import untrained_checkpoint

    from detkd.models.checkpoint import load_payload
    from detkd.serving.export import ExportError, export_detector
    from detkd.serving.speed import SpeedSettings, SpeedUnavailable, measure_speed, split_images

    config = hf_config(tiny_dataset, tiny_config, tmp_path, CONFIGS / "rtdetr_tiny")
    path = untrained_checkpoint(config, tmp_path / "m.pt")
    assert load_detector(path)[0].canvas == 64  # input.size 64: filled in from the input view, as in training
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"differ from PyTorch's.*top-k.*ties"):
        export_detector(path, format="onnx", out=out)
    assert not out.exists()

    config["model"]["hf_canvas"] = None
    unfilled = tmp_path / "unfilled.pt"  # as a checkpoint written before the canvas existed: no canvas
    cfg = validate_config(config, source="test")
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=3)
    assert model.canvas is None
    save_detector(unfilled, model, meta=load_payload(path)["meta"])
    with pytest.raises(ExportError, match=r"without a canvas \(model.hf_canvas\)"):
        export_detector(unfilled, format="onnx", out=out)
    with pytest.raises(SpeedUnavailable, match="without a canvas"):
        measure_speed(unfilled, unfilled, split_images(cfg.data.val, count=2), settings=SpeedSettings(turns=2, calls=2))


def test_a_trained_rtdetr_exports_and_predicts_as_eager_pytorch(tmp_path, tiny_dataset, tiny_config):
    """Trained until its query selection has no ties, an RT-DETR passes the export check on both probes and its
    ONNX predictor returns eager PyTorch's detections on images of other sizes inside the canvas."""
    pytest.importorskip("onnxruntime")
    from factories import untrained_checkpoint

    from detkd.models.checkpoint import load_payload
    from detkd.serving.export import export_detector
    from detkd.serving.predictor import Predictor

    config = hf_config(tiny_dataset, tiny_config, tmp_path, CONFIGS / "rtdetr_tiny")
    config["input"]["max_size"] = 64  # a non-square image then fits the 64 px canvas: 64 x 48
    path = untrained_checkpoint(config, tmp_path / "m.pt")
    model = load_detector(path)[0].train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS_UNTIL_NO_TIES):
        images, targets = [], []
        for _ in range(4):  # a bright square on a dark image: learnt in a few dozen steps
            image = torch.rand(3, 64, 64, generator=generator) * 0.2
            x, y = torch.randint(0, 40, (2,), generator=generator).tolist()
            side = int(torch.randint(12, 24, (1,), generator=generator))
            image[:, y : y + side, x : x + side] = 1.0
            images.append(image)
            targets.append(
                {"boxes": torch.tensor([[x, y, x + side, y + side]], dtype=torch.float), "labels": torch.tensor([1])}
            )
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = tmp_path / "trained.pt"
    save_detector(trained, model.eval(), meta=load_payload(path)["meta"])
    result = export_detector(trained, format="onnx", out=tmp_path / "m.onnx", score_thresh=0.05)
    assert result.max_box_difference_px <= 0.01
    exported, eager = (
        Predictor.from_export(result.path, score_thresh=0.05),
        Predictor.from_checkpoint(trained, score_thresh=0.05),
    )
    for height, width in [(64, 64), (64, 48)]:
        image = (torch.rand(height, width, 3, generator=generator) * 60).to(torch.uint8).numpy()
        image[10:30, 12:32] = 255
        got, expected = exported([image])[0], eager([image])[0]
        assert got.category_ids == expected.category_ids and len(got.boxes) == len(expected.boxes) > 0
        corners = zip(sum(got.boxes, []), sum(expected.boxes, []), strict=True)
        assert max(abs(a - b) for a, b in corners) <= 0.02


STEPS_UNTIL_NO_TIES = 80


def test_a_transformers_model_logs_as_a_pyfunc_that_loads_predicts_and_requires_transformers(
    tmp_path, tiny_dataset, tiny_config
):
    import mlflow
    from factories import registrable_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = hf_config(tiny_dataset, tiny_config, tmp_path, CONFIGS / "rtdetr_tiny")
    _, model_uri = registrable_model(config, tmp_path / "run" / "model.pt", tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "pyfunc")))
    requirements = (local / "requirements.txt").read_text()
    assert f"transformers=={transformers.__version__}" in requirements and "safetensors==" in requirements
    import pandas as pd

    from detkd.tracking.runs import example_image

    predicted = mlflow.pyfunc.load_model(str(local)).predict(pd.DataFrame({"image": [example_image(64)]}))
    assert len(predicted) == 1  # the logged model rebuilds the RT-DETR from its checkpoint alone and predicts
