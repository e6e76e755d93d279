"""COCO box mAP of detections in COCO results format.

faster-coco-eval is the default backend (several times faster, identical numbers);
pycocotools stays available as the reference implementation.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any, Literal

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
Backend = Literal["faster", "pycocotools"]


class EvaluationError(ValueError):
    """Bad ground truth or detections; the message names the file and record."""


def read_json(path: Path, *, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def check_detections(detections: list[dict[str, Any]], gt: dict[str, Any], *, source: str) -> None:
    """Refuse detections that would make COCOeval crash or silently score wrong."""
    if not isinstance(detections, list):
        raise EvaluationError(f"{source}: detections must be a JSON list of objects")
    image_ids = {img["id"] for img in gt.get("images", [])}
    category_ids = {cat["id"] for cat in gt.get("categories", [])}
    for i, det in enumerate(detections):
        where = f"{source}: detection #{i}"
        if not isinstance(det, dict) or not {"image_id", "category_id", "bbox", "score"} <= det.keys():
            raise EvaluationError(f"{where}: needs image_id, category_id, bbox and score")
        if det["image_id"] not in image_ids:
            raise EvaluationError(f"{where}: image_id {det['image_id']} is not in the ground truth")
        if det["category_id"] not in category_ids:
            raise EvaluationError(f"{where}: category_id {det['category_id']} is not in the ground truth")
        bbox = det["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise EvaluationError(f"{where}: bbox must be [x, y, w, h] numbers, got {bbox!r}")


def coco_metrics(
    gt: dict[str, Any], detections: list[dict[str, Any]], *, backend: Backend = "faster"
) -> dict[str, float]:
    """Standard 12-number COCO box evaluation; returns the six headline metrics (0..1)."""
    gt = copy.deepcopy(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    if not detections:
        return {name: 0.0 for name in METRIC_NAMES}
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        coco_gt = COCO(gt)
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=lambda *a, **k: None)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats = evaluator.stats
    else:
        from pycocotools.coco import COCO as PyCOCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = PyCOCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = evaluator.stats
    # COCOeval reports -1 where a size range has no ground truth; keep that as NaN-free 0 would lie.
    return {name: float(stats[i]) for i, name in enumerate(METRIC_NAMES)}


def evaluate_files(gt_path: Path, detections_path: Path, *, backend: Backend = "faster") -> dict[str, float]:
    """Score an existing results file against a COCO ground-truth file."""
    gt = read_json(gt_path, what="ground-truth")
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise EvaluationError(f"{gt_path}: missing top-level key {key!r}")
    detections = read_json(detections_path, what="detections")
    check_detections(detections, gt, source=str(detections_path))
    return coco_metrics(gt, detections, backend=backend)
