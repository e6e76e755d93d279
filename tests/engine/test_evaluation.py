"""COCO evaluation equals pycocotools' COCOeval; bad inputs are named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detkd.engine.coco_eval import METRIC_NAMES, EvaluationError, coco_metrics, evaluate_files


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}]}
    dets = []
    ann_id = 1
    for image_id in range(1, 21):
        gt["images"].append({"id": image_id, "width": 200, "height": 200, "file_name": f"{image_id}.png"})
        for _ in range(rng.integers(0, 6)):
            w, h = rng.uniform(4, 120, size=2)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 200 - h)
            cat = int(rng.choice([1, 5]))
            crowd = int(rng.random() < 0.05)
            gt["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": crowd,
                }
            )
            ann_id += 1
            if rng.random() < 0.8:  # a noisy true positive
                jitter = rng.normal(0, 0.03 * max(w, h), size=4)
                dets.append(
                    {
                        "image_id": image_id,
                        "category_id": cat,
                        "score": float(rng.random()),
                        "bbox": [x + jitter[0], y + jitter[1], max(1, w + jitter[2]), max(1, h + jitter[3])],
                    }
                )
        for _ in range(rng.integers(0, 4)):  # false positives
            w, h = rng.uniform(4, 80, size=2)
            dets.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice([1, 5])),
                    "score": float(rng.random()),
                    "bbox": [float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), w, h],
                }
            )
    return gt, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_backend_equals_pycocotools(seed):
    gt, dets = _random_case(seed)
    fast = coco_metrics(gt, dets, backend="faster")
    reference = coco_metrics(gt, dets, backend="pycocotools")
    assert set(fast) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert fast[name] == pytest.approx(reference[name], abs=1e-9), name
    assert 0.05 < fast["AP"] < 0.95  # a non-trivial case, not all zeros or ones


def test_perfect_detections_score_one():
    gt, _ = _random_case(3)
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    assert coco_metrics(gt, dets)["AP"] == pytest.approx(1.0)
    assert coco_metrics(gt, [])["AP"] == 0.0


def test_evaluate_files_and_bad_inputs(tmp_path):
    gt, dets = _random_case(4)
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    det_path.write_text(json.dumps(dets))
    assert evaluate_files(gt_path, det_path) == coco_metrics(gt, dets)

    det_path.write_text(json.dumps(dets + [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]))
    with pytest.raises(EvaluationError, match=rf"dets.json: detection #{len(dets)}: image_id 999"):
        evaluate_files(gt_path, det_path)
    det_path.write_text(json.dumps([{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1}]))
    with pytest.raises(EvaluationError, match="category_id 2 is not in the ground truth"):
        evaluate_files(gt_path, det_path)
    det_path.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 1}]))
    with pytest.raises(EvaluationError, match="bbox must be"):
        evaluate_files(gt_path, det_path)
    det_path.write_text("[{")
    with pytest.raises(EvaluationError, match="dets.json: malformed JSON at line 1"):
        evaluate_files(gt_path, det_path)
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_files(tmp_path / "missing.json", det_path)
