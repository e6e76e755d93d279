"""The transformer teacher pipeline's models deployed: each exported to ONNX as ``detkd export`` writes it, and
the students' deployed speed against the RT-DETR teacher they learned from.

    python benchmarks/transformer_export.py     # after the two commands of pipelines/transformer_teacher.yaml

Writes ``benchmarks/results/transformer_export.{json,md}``. For each model: whether ``detkd export`` wrote it
(a transformers detector as one graph at its square canvas; its check against eager PyTorch on two probe
images) and the largest box difference the check measured. For each student: the deployed speed of
``detkd.serving.speed`` (both models exported to ONNX and run in alternating turns through the Predictor, one
ONNX Runtime thread, on the validation images) against the RT-DETR teacher as the reference.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="the pipeline's workdir")
    parser.add_argument("--images", type=int, default=32, help="validation images the speed is measured on")
    parser.add_argument("--out", type=Path, default=RESULTS / "transformer_export")
    args = parser.parse_args()

    from detkd.models.checkpoint import checkpoint_plan, load_detector
    from detkd.serving.export import ExportError, export_detector
    from detkd.serving.speed import SpeedSettings, measure_speed, split_images

    teacher = checkpoint(args.workdir, TEACHER)
    model, meta = load_detector(teacher)
    plan = checkpoint_plan(teacher, meta)
    images = split_images(plan.config.data.val, count=args.images)
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
        speeds[name] = report.metrics()
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
        f"`{record['command']}` · one run · {platform.machine()}, {len(images)} validation images · written by the "
        "script (numbers in the JSON beside it)",
        "",
        "| model | exported | max box difference vs eager (px) | speedup over the RT-DETR teacher | ms/image |",
        "|---|---|---|---|---|",
    ]
    reference_ms = statistics.median(speed["reference_latency_ms"] for speed in speeds.values())
    for name in (TEACHER, *STUDENTS):
        export = exports[name]
        written = "yes" if export["exported"] else "no: " + export["reason"][:80]
        difference = f"{export['max_box_difference_px']:.2g}" if export["exported"] else "-"
        if name == TEACHER:
            speed, latency = "(the reference)", f"{reference_ms:.2f} (median of its turns)"
        else:
            speed, latency = f"{speeds[name]['speedup']:.2f}x", f"{speeds[name]['latency_ms']:.2f}"
        lines.append(f"| {name} | {written} | {difference} | {speed} | {latency} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {repo_path(args.out.with_suffix('.md'))}")


if __name__ == "__main__":
    main()
