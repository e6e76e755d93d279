"""detkd export: ONNX (run by ONNX Runtime) and TorchScript give PyTorch's detections; bad input is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detkd.cli import app
from detkd.serving.export import EXPORT_TOLERANCE_PX, read_info
from detkd.serving.predictor import Predictor

runner = CliRunner()


def images_of(dataset: Path, split: str = "val", count: int = 6) -> list[bytes]:
    coco = json.loads((dataset / f"annotations/instances_{split}.json").read_text())
    return [(dataset / f"images/{split}" / im["file_name"]).read_bytes() for im in coco["images"][:count]]


@pytest.fixture(scope="module")
def trained_lite(tiny_dataset, tiny_config, ray_cluster, tmp_path_factory) -> Path:
    """A lite-design FCOS (detkd.models.lite) on P2-P4, trained through Ray Train like any student."""
    from detkd.config import Config
    from detkd.engine.launch import run_training
    from detkd.records import TrackingContext

    work = tmp_path_factory.mktemp("lite")
    model = {"design": "lite", "min_level": 2, "max_level": 4}
    cfg = Config.model_validate(tiny_config(tiny_dataset, work, model=model, train={"epochs": 12}, optim={"lr": 0.004}))
    outcome = run_training(cfg, tracking=TrackingContext(uri=f"sqlite:///{work / 'mlflow.db'}", experiment="detkd"))
    return outcome.model_path


@pytest.mark.ray
@pytest.mark.parametrize(
    "fmt,model", [("onnx", "standard"), ("torchscript", "standard"), ("onnx", "lite"), ("torchscript", "lite")]
)
def test_export_gives_pytorch_detections(fmt, model, request, varied_dataset, tmp_path):
    if model == "standard":
        checkpoint = request.getfixturevalue("trained_detector").model_path
    else:
        checkpoint = request.getfixturevalue("trained_lite")
    out = tmp_path / f"student.{fmt}"
    result = runner.invoke(app, ["export", str(checkpoint), "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "of PyTorch on a probe image" in " ".join(result.output.split())  # one probe: dynamic sizes
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    info = read_info(out)
    assert info["format"] == fmt and info["score_thresh"] == 0.05 and len(info["categories"]) == 3

    # images of other sizes and aspect ratios than the training ones: dynamic height and width
    images = images_of(varied_dataset)
    # a threshold above the export's 0.05 and fewer than 100 detections per image: no detection sits at a
    # cut-off where a 1e-6 score difference could keep it in one runtime and drop it in the other (the lite
    # model, less converged after 12 tiny epochs, scores more weak boxes above 0.2)
    threshold = {"standard": 0.2, "lite": 0.4}[model]
    eager = Predictor.from_checkpoint(checkpoint, score_thresh=threshold)(images)
    exported = Predictor.from_export(out, score_thresh=threshold)(images)
    assert sum(len(d.boxes) for d in eager) > 0 and max(len(d.boxes) for d in eager) < 100
    for want, got in zip(eager, exported, strict=True):
        # the same detections; equal scores (a box kept for two classes) may come in either order
        want_items, got_items = canonical(want), canonical(got)
        assert [w[:2] for w in want_items] == [g[:2] for g in got_items]  # categories and names
        for w, g in zip(want_items, got_items, strict=True):
            assert g[2] == pytest.approx(w[2], abs=1e-4)
            assert g[3] == pytest.approx(w[3], abs=EXPORT_TOLERANCE_PX + 0.01)  # + the 0.01 px rounding of boxes


@pytest.mark.ray
def test_fcos_onnx_graph_is_lean(trained_detector, tmp_path):
    """The FCOS export graph computes torchvision's detections with under half the nodes of its traced forward."""
    import onnx
    import torch

    from detkd.models.checkpoint import load_detector
    from detkd.serving.export import SingleImageDetector, export_module, write_onnx
    from detkd.serving.export_graph import FCOSExportGraph

    model, _ = load_detector(trained_detector.model_path)
    lean = export_module(model.eval(), format="onnx")
    assert isinstance(lean, FCOSExportGraph)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0))
    write_onnx(lean, image, tmp_path / "lean.onnx", {})
    write_onnx(SingleImageDetector(model).eval(), image, tmp_path / "traced.onnx", {})
    count = {
        name: sum(node.op_type != "Constant" for node in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node)
        for name in ("lean", "traced")
    }
    assert count["lean"] * 2 < count["traced"], count


def canonical(detections) -> list[tuple]:
    items = zip(detections.category_ids, detections.names, detections.scores, detections.boxes, strict=True)
    return sorted(items, key=lambda d: (d[0], round(d[2], 3), [round(v, 1) for v in d[3]]))


@pytest.mark.ray
def test_exported_threshold_is_a_floor(trained_detector, tiny_dataset, tmp_path):
    out = tmp_path / "strict.onnx"
    result = runner.invoke(
        app,
        ["export", str(trained_detector.model_path), "--format", "onnx", "--out", str(out), "--score-threshold", "0.5"],
    )
    assert result.exit_code == 0, result.output
    predictor = Predictor.from_export(out, score_thresh=0.6)
    assert all(min(d.scores, default=1.0) >= 0.6 for d in predictor(images_of(tiny_dataset)))
    predictor.score_thresh = 0.1
    with pytest.raises(ValueError, match="exported with score threshold 0.5"):
        predictor(images_of(tiny_dataset, count=1))


@pytest.mark.ray
def test_bad_export_requests_are_refused_and_write_nothing(trained_detector, tmp_path):
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(trained_detector.model_path), "--format", "tflite", "--out", str(out)])
    assert result.exit_code == 2 and "--format must be one of onnx, torchscript" in result.output

    missing = tmp_path / "absent.pt"
    result = runner.invoke(app, ["export", str(missing), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 2 and str(missing) in result.output

    corrupt = tmp_path / "corrupt.pt"
    shutil.copyfile(trained_detector.model_path, corrupt)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    result = runner.invoke(app, ["export", str(corrupt), "--format", "torchscript", "--out", str(out)])
    assert result.exit_code == 2 and "corrupt" in result.output
    assert not out.exists() and not list(tmp_path.glob(".model.onnx.*"))
