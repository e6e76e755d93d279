"""The MLflow model of a detkd detector, logged as code (MLflow's models-from-code).

MLflow copies this file into the logged model and runs it on load, so loading a detkd
model unpickles nothing: the only artifact is the detkd checkpoint, read with
``weights_only=True`` and verified by its checksum. (It imports MLflow because MLflow
loads it by path; everything else that talks to MLflow lives in ``detkd.tracking.runs``.)

Input: a DataFrame with a binary column ``image`` (encoded PNG/JPEG; base64 strings
over REST). Output: one row per image with ``boxes`` (x1, y1, x2, y2 in the original
image's pixels), ``scores``, ``category_ids`` and ``names``. Params: ``score_threshold``
and ``max_detections``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

CHECKPOINT_ARTIFACT = "checkpoint"
DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_MAX_DETECTIONS = 100


class DetkdDetector(PythonModel):
    """Images in, detections in original coordinates out (see :class:`detkd.serving.Predictor`)."""

    def load_context(self, context) -> None:
        from detkd.serving import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        if "image" not in model_input:
            raise ValueError(f"the input needs an 'image' column of encoded images; got {list(model_input.columns)}")
        self.predictor.score_thresh = float(params.get("score_threshold", DEFAULT_SCORE_THRESHOLD))
        self.predictor.detections_per_img = int(params.get("max_detections", DEFAULT_MAX_DETECTIONS))
        detections = self.predictor(list(model_input["image"]))
        return pd.DataFrame([d.as_dict() for d in detections], columns=["boxes", "scores", "category_ids", "names"])


mlflow.models.set_model(DetkdDetector())
