"""Run a detector over a split and turn its outputs into COCO results.

Boxes are mapped back to the original image coordinates with the per-sample
``scale`` the transforms recorded, so a 64 px student and a 128 px teacher are
scored against the same ground truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from detkd.data.dataset import DetectionDataset, collate_detection
from detkd.data.records import DetectionSource
from detkd.engine.coco_eval import coco_metrics
from detkd.models.detectors import set_inference_thresholds, unwrap_model


def label_to_category(source: DetectionSource) -> dict[int, int]:
    """Contiguous label (1..K) -> COCO category id."""
    return {source.label_of(cat.id): cat.id for cat in source.categories}


@dataclass
class Predictions:
    detections: list[dict[str, Any]]
    images: int
    forward_seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.forward_seconds if self.forward_seconds > 0 else 0.0


@torch.inference_mode()
def predict(
    model: nn.Module,
    dataset: DetectionDataset,
    *,
    device: torch.device,
    batch_size: int,
    score_thresh: float,
    detections_per_img: int,
    indices: list[int] | None = None,
    loader_workers: int = 0,
) -> Predictions:
    """Detections in COCO results format (original image coordinates)."""
    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    set_inference_thresholds(inner, score_thresh=score_thresh, detections_per_img=detections_per_img)
    subset = dataset if indices is None else Subset(dataset, indices)
    loader = DataLoader(
        subset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection, num_workers=loader_workers
    )
    to_category = label_to_category(dataset.source)
    detections: list[dict[str, Any]] = []
    seconds, count = 0.0, 0
    for images, targets in loader:
        images = [img.to(device) for img in images]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        outputs = inner(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        count += len(images)
        for output, target in zip(outputs, targets, strict=True):
            scale = target["scale"].to(torch.float32)
            boxes = output["boxes"].float().cpu() / torch.cat([scale, scale])
            for box, score, label in zip(
                boxes.tolist(), output["scores"].float().cpu().tolist(), output["labels"].cpu().tolist(), strict=True
            ):
                if label not in to_category:
                    continue
                x1, y1, x2, y2 = box
                detections.append(
                    {
                        "image_id": int(target["image_id"]),
                        "category_id": to_category[label],
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(float(score), 5),
                    }
                )
    inner.train(was_training)
    return Predictions(detections, count, seconds)


def gather_detections(local: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Concatenate every worker's detections (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return local
    parts: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [det for part in parts for det in (part or [])]


def evaluate_distributed(
    model: nn.Module,
    dataset: DetectionDataset,
    *,
    device: torch.device,
    batch_size: int,
    score_thresh: float,
    detections_per_img: int,
    rank: int,
    world_size: int,
) -> dict[str, float] | None:
    """Each worker predicts every world_size-th image; rank 0 scores the union."""
    indices = list(range(rank, len(dataset), world_size))
    preds = predict(
        model,
        dataset,
        device=device,
        batch_size=batch_size,
        score_thresh=score_thresh,
        detections_per_img=detections_per_img,
        indices=indices,
    )
    everything = gather_detections(preds.detections)
    if rank != 0:
        return None
    return coco_metrics(dataset.source.to_coco_dict(), everything)


@dataclass
class CheckpointEvaluation:
    metrics: dict[str, float]
    images_per_s: float
    input_size: int
    detections: list[dict[str, Any]]
    meta: dict[str, Any]


def evaluate_checkpoint(
    model_path,
    source: DetectionSource,
    *,
    batch_size: int = 8,
    score_thresh: float = 0.01,
    detections_per_img: int = 100,
    device: torch.device | None = None,
) -> CheckpointEvaluation:
    """Load a detkd checkpoint (teacher or student) and score it on ``source``.

    The images are prepared by the same ``eval_transform`` of the same plan as the Ray
    worker's ``val/AP``, so both numbers agree exactly.
    """
    from detkd.engine.datasets import eval_dataset
    from detkd.models.checkpoint import checkpoint_input, load_detector

    device = device or torch.device("cpu")
    model, meta = load_detector(model_path)
    spec = checkpoint_input(model_path, meta)
    model.to(device)
    preds = predict(
        model,
        eval_dataset(source, spec),
        device=device,
        batch_size=batch_size,
        score_thresh=score_thresh,
        detections_per_img=detections_per_img,
    )
    metrics = coco_metrics(source.to_coco_dict(), preds.detections)
    return CheckpointEvaluation(metrics, preds.images_per_s, spec.model_size, preds.detections, meta)
