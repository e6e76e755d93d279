"""Deployed speed: a student against a reference model, as ``detkd export`` ships them, on this machine.

Both checkpoints are exported to ONNX the way ``detkd export`` does (the lean FCOS graph where
there is one, checked against eager PyTorch) and run by ONNX Runtime at batch 1 through
:class:`detkd.serving.predictor.Predictor` on decoded images (resize to each model's own input
view, network, box decoding, NMS, boxes back to original pixels). The two take turns in this one
process: in each turn a block of calls of one, then of the other, the order flipping every turn. A
machine whose speed drifts over seconds and minutes (a shared node, another trial starting) slows both
alike, and each block runs on warm caches as a deployed model does (alternating call by call instead
evicts them, and the small student pays most: 2.6x instead of 3x for the quickstart's). ``speedup`` is
the median over turns of the reference's median latency over the student's in the same turn. A sweep
trial, the registry gate and the speed benchmark all measure this way, so their numbers speak one unit.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from detkd.config import _Section
from detkd.serving.export import EXPORT_SCORE_THRESH

SPEED_KEYS = ("speedup", "latency_ms", "images_per_s")


class SpeedSettings(_Section):
    """How deployed speed is measured (a space's ``speed:``, a registry gate's ``speed:``)."""

    reference: str | None = Field(
        None,
        description="the model speed is compared with: a pipeline model's name or a checkpoint path "
        "(default: the student's teacher)",
    )
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads (1: what `detkd export` files run with)")
    turns: int = Field(
        8, ge=1, description="turns of reference and student, the order flipping each turn (even: both orders alike)"
    )
    calls: int = Field(40, ge=1, description="timed batch-1 calls per model per turn")
    images: int = Field(8, ge=1, description="validation images the calls cycle through")
    score_threshold: float = Field(
        EXPORT_SCORE_THRESH, gt=0, lt=1, description="the exported graphs' score threshold (NMS cost depends on it)"
    )


class SpeedUnavailable(RuntimeError):
    """The model cannot be exported to ONNX (an MMDetection or multi-scale model): no deployed speed."""


@dataclass(frozen=True)
class SpeedReport:
    """One measurement: the student's latency and its speedup over the reference, with how noisy it was."""

    speedup: float  # median over turns of reference latency / student latency
    latency_ms: float  # the student's median per-image latency over turns
    reference_latency_ms: float
    speedup_spread: float  # (max - min) / 2 of the per-turn ratios, relative to the median
    reference: str
    turns: int
    calls: int
    threads: int
    machine: str

    @property
    def images_per_s(self) -> float:
        return 1000.0 / self.latency_ms

    def metrics(self) -> dict[str, float]:
        """The numbers a trial reports to Tune and logs to MLflow (``SPEED_KEYS`` and the reference's)."""
        return {
            "speedup": round(self.speedup, 4),
            "latency_ms": round(self.latency_ms, 4),
            "images_per_s": round(self.images_per_s, 2),
            "reference_latency_ms": round(self.reference_latency_ms, 4),
            "speedup_spread": round(self.speedup_spread, 4),
        }

    def tags(self) -> dict[str, str]:
        """Where and how it was measured: a speed is only meaningful on its machine and against its reference."""
        return {
            "speed.reference": self.reference,
            "speed.backend": f"onnxruntime {onnxruntime_version()}, batch 1, {self.threads} thread(s)",
            "speed.turns": f"{self.turns} x {self.calls} calls",
            "speed.machine": self.machine,
        }


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def machine_name() -> str:
    import os

    return f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})"


def exported_predictor(checkpoint: Path, folder: Path, *, settings: SpeedSettings, name: str):
    """``checkpoint`` exported to ONNX under ``folder``, loaded as a Predictor (SpeedUnavailable if it cannot be)."""
    from detkd.serving.export import ExportError, export_detector
    from detkd.serving.predictor import Predictor

    out = folder / f"{name}.onnx"
    try:
        export_detector(checkpoint, format="onnx", out=out, score_thresh=settings.score_threshold)
    except ExportError as exc:
        raise SpeedUnavailable(str(exc)) from None
    return Predictor.from_export(out, score_thresh=settings.score_threshold, threads=settings.threads)


def timed_block(predictor: Any, images: Sequence[torch.Tensor], *, calls: int, start: int) -> float:
    """Median milliseconds of ``calls`` batch-1 calls of one model (after one warm-up call), cycling the images."""
    predictor([images[start % len(images)]])
    times = []
    for k in range(calls):
        image = images[(start + k) % len(images)]
        begin = time.perf_counter()
        predictor([image])
        times.append((time.perf_counter() - begin) * 1000.0)
    return statistics.median(times)


def measure_speed(
    student: Path,
    reference: Path,
    images: Sequence[torch.Tensor],
    *,
    settings: SpeedSettings,
    reference_name: str | None = None,
) -> SpeedReport:
    """The student's deployed latency and its speedup over ``reference`` (see the module docstring).

    ``images``: decoded CHW float images at their original size (each model resizes them to its own
    view). Raises SpeedUnavailable when either model cannot be exported to ONNX."""
    if not images:
        raise ValueError("measuring speed needs at least one image")
    images = list(images)[: settings.images]
    with tempfile.TemporaryDirectory(prefix="detkd-speed-") as folder:
        try:
            reference_predictor = exported_predictor(reference, Path(folder), settings=settings, name="reference")
        except SpeedUnavailable as exc:
            raise SpeedUnavailable(f"the reference {reference_name or reference}: {exc}") from None
        student_predictor = exported_predictor(student, Path(folder), settings=settings, name="student")
        pair = [("reference", reference_predictor), ("student", student_predictor)]
        ratios, student_ms, reference_ms = [], [], []
        for turn in range(settings.turns):
            timed = {
                role: timed_block(predictor, images, calls=settings.calls, start=turn * settings.calls)
                for role, predictor in (pair if turn % 2 == 0 else pair[::-1])
            }
            ratios.append(timed["reference"] / timed["student"])
            student_ms.append(timed["student"])
            reference_ms.append(timed["reference"])
    speedup = statistics.median(ratios)
    return SpeedReport(
        speedup=speedup,
        latency_ms=statistics.median(student_ms),
        reference_latency_ms=statistics.median(reference_ms),
        speedup_spread=(max(ratios) - min(ratios)) / 2 / speedup,
        reference=reference_name or str(reference),
        turns=settings.turns,
        calls=settings.calls,
        threads=settings.threads,
        machine=machine_name(),
    )


def split_images(split: Any, *, count: int) -> list[torch.Tensor]:
    """The first ``count`` images of a data split (a config's ``data.val``), decoded: what speed is measured on."""
    from detkd.data import open_source
    from detkd.serving.predictor import image_tensor

    fields = ("coco", "images", "parquet", "yolo", "voc", "split", "classes")
    source = open_source(**{name: getattr(split, name) for name in fields}, skip_invalid=True)
    return [image_tensor(source.image_reader(record)) for record in source.records[:count]]


def speed_description(metrics: dict[str, Any]) -> str:
    """One line for a log: ``3.12x the reference (2.41 ms/image, 415 images/s)``."""
    return (
        f"{metrics['speedup']:.2f}x the reference ({metrics['latency_ms']:.2f} ms/image, "
        f"{metrics['images_per_s']:.0f} images/s, turns within ±{100 * metrics['speedup_spread']:.0f}%)"
    )
