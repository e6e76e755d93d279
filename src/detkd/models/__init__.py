"""Detector builders, checkpoints and feature taps (plain PyTorch: no Ray, no MLflow)."""

from detkd.models.checkpoint import (
    CheckpointError,
    copy_matching_weights,
    load_detector,
    save_detector,
)
from detkd.models.detectors import (
    ARCHS,
    DETECTOR_BUILDERS,
    build_detector,
    build_detector_from_config,
    build_fasterrcnn,
    build_fcos,
    build_retinanet,
    detector_config,
    fasterrcnn_from_config,
    fcos_from_config,
    pyramid_strides,
    retinanet_from_config,
    set_inference_thresholds,
    unwrap_model,
)
from detkd.models.multiscale import MultiScaleDetector
from detkd.models.pretrained import build_model, check_weights, load_weights
from detkd.models.taps import DetectorTaps, has_dense_logits

__all__ = [
    "ARCHS",
    "DETECTOR_BUILDERS",
    "CheckpointError",
    "DetectorTaps",
    "MultiScaleDetector",
    "build_detector",
    "build_detector_from_config",
    "build_fasterrcnn",
    "build_fcos",
    "build_model",
    "build_retinanet",
    "check_weights",
    "copy_matching_weights",
    "detector_config",
    "fasterrcnn_from_config",
    "fcos_from_config",
    "has_dense_logits",
    "load_detector",
    "load_weights",
    "pyramid_strides",
    "retinanet_from_config",
    "save_detector",
    "set_inference_thresholds",
    "unwrap_model",
]
