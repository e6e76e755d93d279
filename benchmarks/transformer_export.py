"""The transformer teacher pipeline's models deployed: each exported to ONNX as ``detkd export`` writes it, and
the students' deployed speed against the RT-DETR teacher they learned from.

    python benchmarks/transformer_export.py     # after the two commands of pipelines/transformer_teacher.yaml

Writes ``benchmarks/results/transformer_export.{json,md}``. For each model: whether ``detkd export`` wrote it
(a transformers detector as one graph at its square canvas; its check against eager PyTorch on two probe
images) and the largest box difference the check measured. For each student: the deployed speed of
``detkd.serving.speed`` (both models exported to ONNX and run in alternating turns through the Predictor, one
ONNX Runtime thread, on the validation images) against the RT-DETR teacher as the reference, and the boxes its
graph hands to NMS per image on those images (work that differs between students of one network).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from repo_paths import repo_command, repo_path  # this folder is on sys.path when run

RESULTS = Path(__file__).resolve().parent / "results"
WORKDIR = Path("runs/transformer_teacher")
TEACHER = "rtdetr_teacher"
STUDENTS = ("student_baseline", "student_rtdetr", "student_vit", "student_both")


def checkpoint(workdir: Path, name: str) -> Path:
    path = workdir / "models" / name / "model.pt"
    if not path.is_file():
        sys.exit(f"error: {path}: not found; run pipelines/transformer_teacher.yaml first (its header says how)")
    return path


def nms_candidates(path: Path, images: list) -> float:
    """Boxes per image that a student's exported graph hands to NMS at the export threshold (its score cut, before
    NMS): where two students of one network can differ in deployed speed."""
    import torch

    import detkd.serving.export_graph as export_graph
    from detkd.models.detectors import set_inference_thresholds
    from detkd.serving.export import EXPORT_SCORE_THRESH, export_module
    from detkd.serving.predictor import Predictor

    predictor = Predictor.from_checkpoint(path)
    set_inference_thresholds(predictor.backend.model, score_thresh=EXPORT_SCORE_THRESH, detections_per_img=100)
    graph = export_module(predictor.backend.model, format="onnx")
    counts: list[int] = []
    nms = export_graph.box_ops.batched_nms

    def counting_nms(boxes, scores, labels, threshold):
        counts.append(len(boxes))
        return nms(boxes, scores, labels, threshold)

    export_graph.box_ops.batched_nms = counting_nms
    try:
        with torch.inference_mode():
            for image in predictor.prepare(images)[0]:
                graph(image)
    finally:
        export_graph.box_ops.batched_nms = nms
    return sum(counts) / len(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="the pipeline's workdir")
    parser.add_argument("--out", type=Path, default=RESULTS / "transformer_export")
    args = parser.parse_args()

    from detkd.models.checkpoint import checkpoint_plan, load_detector
    from detkd.serving.export import ExportError, export_detector
    from detkd.serving.speed import SpeedSettings, measure_speed, split_images

    teacher = checkpoint(args.workdir, TEACHER)
    model, meta = load_detector(teacher)
    plan = checkpoint_plan(teacher, meta)
    images = split_images(plan.config.data.val, count=SpeedSettings().images)
    exports = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in (TEACHER, *STUDENTS):
            try:
                result = export_detector(
                    checkpoint(args.workdir, name), format="onnx", out=Path(scratch) / f"{name}.onnx"
                )
                exports[name] = {"exported": True, "max_box_difference_px": result.max_box_difference_px}
            except ExportError as exc:
                exports[name] = {"exported": False, "reason": str(exc)}
            print(f"{name}: {exports[name]}", flush=True)
    settings = SpeedSettings()
    speeds = {}
    for name in STUDENTS:
        report = measure_speed(
            checkpoint(args.workdir, name), teacher, images, settings=settings, reference_name=TEACHER
        )
        speeds[name] = {
            **report.metrics(),
            "nms_candidates_per_image": nms_candidates(checkpoint(args.workdir, name), images),
        }
        print(f"{name}: {speeds[name]}", flush=True)
    record = {
        "command": repo_command(sys.argv),
        "workdir": repo_path(args.workdir),
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "teacher": TEACHER,
        "teacher_canvas": model.canvas_side,
        "speed_settings": settings.model_dump(),
        "images": len(images),
        "exports": exports,
        "speed": speeds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# The transformer teacher pipeline's models, exported and timed",
        "",
        f"`{record['command']}` · one run · {platform.machine()}, {os.cpu_count()} CPUs · speed: "
        f"{settings.turns} alternating turns of {settings.calls} calls over {len(images)} validation images, one ONNX "
        "Runtime thread · written by the script (numbers in the JSON beside it)",
        "",
        "| model | exported | max box difference vs eager (px) | speedup over the RT-DETR teacher | ms/image "
        "| boxes into NMS per image |",
        "|---|---|---|---|---|---|",
    ]
    reference_ms = statistics.median(speed["reference_latency_ms"] for speed in speeds.values())
    for name in (TEACHER, *STUDENTS):
        export = exports[name]
        written = "yes" if export["exported"] else "no: " + export["reason"][:80]
        difference = f"{export['max_box_difference_px']:.2g}" if export["exported"] else "-"
        if name == TEACHER:
            speed, latency, boxes = "(the reference)", f"{reference_ms:.2f} (median of its turns)", "-"
        else:
            speed, latency = f"{speeds[name]['speedup']:.2f}x", f"{speeds[name]['latency_ms']:.2f}"
            boxes = f"{speeds[name]['nms_candidates_per_image']:.0f}"
        lines.append(f"| {name} | {written} | {difference} | {speed} | {latency} | {boxes} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {repo_path(args.out.with_suffix('.md'))}")


if __name__ == "__main__":
    main()
