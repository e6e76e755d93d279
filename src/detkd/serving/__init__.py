"""Deployed forms of a trained detector: the Predictor, ONNX/TorchScript export, the lean FCOS export graph.

``detkd.serving.Predictor`` is the stable entry point that logged MLflow models import.
"""

from detkd.serving.predictor import Predictor

__all__ = ["Predictor"]
