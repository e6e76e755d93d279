"""Detector builders, checkpoints and feature taps (plain PyTorch: no Ray, no MLflow)."""

from detkd.models.checkpoint import CheckpointError, load_detector, save_detector
from detkd.models.detectors import ARCHS, build_detector, detector_config, pyramid_strides
from detkd.models.taps import DetectorTaps

__all__ = [
    "ARCHS",
    "CheckpointError",
    "DetectorTaps",
    "build_detector",
    "detector_config",
    "load_detector",
    "pyramid_strides",
    "save_detector",
]
