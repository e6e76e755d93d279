"""The shippable model: a trained detector logged as an MLflow pyfunc from code, loaded and served.

One tiny model is trained through Ray Train (the launcher logs the pyfunc, as every run with
``tracking.log_model`` does); the tests load it the ways a user would and compare detections.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from detkd.data.coco import load_coco
from detkd.engine.evaluate import evaluate_checkpoint
from detkd.serving.predictor import Predictor


@pytest.fixture(scope="module")
def logged(trained_detector):
    """(tracking URI, run id, checkpoint) of the session's tiny trained detector."""
    mlflow.set_tracking_uri(trained_detector.tracking_uri)
    return trained_detector.tracking_uri, trained_detector.run_id, trained_detector.model_path


def val_images(dataset: Path, count: int) -> list[bytes]:
    coco = json.loads((dataset / "annotations/instances_val.json").read_text())
    return [(dataset / "images/val" / im["file_name"]).read_bytes() for im in coco["images"][:count]]


@pytest.mark.ray
def test_logged_model_holds_code_and_the_checkpoint_no_pickle(logged, tmp_path):
    uri, run_id, checkpoint = logged
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path)))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert "pyfunc_model.py" in files and "artifacts/model.pt" in files
    assert (local / "artifacts/model.pt").read_bytes() == checkpoint.read_bytes()
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.signature.inputs.input_names() == ["image"]
    assert [p.name for p in info.signature.params.params] == ["score_threshold", "max_detections"]


@pytest.mark.ray
def test_pyfunc_predicts_what_the_checkpoint_evaluates_to(logged, tiny_dataset, varied_dataset):
    """Boxes in each image's own pixels: the same detections detkd evaluate scores, on images of other sizes too."""
    uri, run_id, checkpoint = logged
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    coco = json.loads((varied_dataset / "annotations/instances_val.json").read_text())
    images = coco["images"][:6]
    frame = pd.DataFrame({"image": [(varied_dataset / "images/val" / im["file_name"]).read_bytes() for im in images]})
    out = model.predict(frame, params={"score_threshold": 0.01, "max_detections": 100})
    assert list(out.columns) == ["boxes", "scores", "category_ids", "names"] and len(out) == len(images)

    source = load_coco(varied_dataset / "annotations/instances_val.json", varied_dataset / "images/val")
    # batch 1: a batch of mixed sizes is padded to its largest image, which changes a padded image's scores
    reference = evaluate_checkpoint(checkpoint, source, batch_size=1, score_thresh=0.01).detections
    names = {c["id"]: c["name"] for c in coco["categories"]}
    total = 0
    for image, row in zip(images, out.itertuples(), strict=True):
        expected = sorted((d for d in reference if d["image_id"] == image["id"]), key=lambda d: -d["score"])
        assert len(row.boxes) == len(expected)
        total += len(expected)
        for box, score, category, name, ref in zip(
            row.boxes, row.scores, row.category_ids, row.names, expected, strict=True
        ):
            x, y, w, h = ref["bbox"]
            assert box == pytest.approx([x, y, x + w, y + h], abs=0.02)
            assert score == pytest.approx(ref["score"], abs=1e-4)
            assert category == ref["category_id"] and name == names[category]
            assert -1 <= box[0] <= box[2] <= image["width"] + 1 and -1 <= box[1] <= box[3] <= image["height"] + 1
    assert total > 0

    strict = model.predict(frame, params={"score_threshold": 0.99, "max_detections": 1})
    assert all(len(boxes) <= 1 for boxes in strict["boxes"])


@pytest.mark.ray
def test_undecodable_image_is_refused_naming_it(logged):
    uri, run_id, _ = logged
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    with pytest.raises(Exception, match="not a decodable image"):
        model.predict(pd.DataFrame({"image": [b"not a png"]}))


@pytest.mark.ray
@pytest.mark.server
def test_mlflow_models_serve_answers_a_real_image(logged, tiny_dataset, unused_port, server_process, tmp_path):
    uri, run_id, _ = logged
    port = unused_port
    # mlflow models serve execs uvicorn by name: this interpreter's scripts folder goes first on PATH
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"runs:/{run_id}/model"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    images = val_images(tiny_dataset, 2)
    body = {
        "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(img).decode()] for img in images]},
        "params": {"score_threshold": 0.05},
    }
    with server_process(command, ready_url=f"http://127.0.0.1:{port}/ping", log_path=tmp_path / "serve.log", env=env):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"]
    local = Predictor.from_checkpoint(logged[2], score_thresh=0.05)(images)
    assert len(served) == 2
    for row, expected in zip(served, local, strict=True):
        assert [v for box in row["boxes"] for v in box] == pytest.approx([v for box in expected.boxes for v in box])
        assert row["category_ids"] == expected.category_ids and row["names"] == expected.names
