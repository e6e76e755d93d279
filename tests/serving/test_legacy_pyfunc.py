"""A model logged to MLflow by an older detkd still loads and predicts the same detections.

The fixture is the model folder as MLflow stored it (its pyfunc file imports the module paths of
detkd 0.1), with the predictions that version made; users' registries are full of such models.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

LEGACY = Path(__file__).resolve().parents[1] / "fixtures/legacy_pyfunc_model"


def test_model_logged_by_detkd_0_1_loads_and_predicts_as_it_did():
    code = (LEGACY / "model/pyfunc_model.py").read_text()
    assert "from detkd.inference import Predictor" in code  # the old entry point, as logged
    expected = json.loads((LEGACY / "expected.json").read_text())
    model = mlflow.pyfunc.load_model(str(LEGACY / "model"))
    rows = expected["predictions"]
    frame = pd.DataFrame({"image": [(LEGACY / "images" / row["image"]).read_bytes() for row in rows]})
    params = {"score_threshold": expected["score_threshold"], "max_detections": expected["max_detections"]}
    out = model.predict(frame, params=params)
    assert len(out) == len(rows)
    for row, got in zip(rows, out.itertuples(), strict=True):
        assert len(got.scores) == len(row["scores"]) > 0
        assert list(got.scores) == pytest.approx(row["scores"], abs=1e-5)
        for box, ref in zip(got.boxes, row["boxes"], strict=True):
            assert list(box) == pytest.approx(ref, abs=1e-3)
        assert list(got.category_ids) == row["category_ids"] and list(got.names) == row["names"]
