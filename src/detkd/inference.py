"""Kept for models already logged to MLflow: their pyfunc file (detkd 0.1) runs
``from detkd.inference import Predictor`` on load. New code and new models use ``detkd.serving``."""

from detkd.serving import Predictor

__all__ = ["Predictor"]
