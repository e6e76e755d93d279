"""Deployed speed of a teacher and its low-resolution student: PyTorch eager against ONNX Runtime
(and TorchScript), at batch 1 and 8, on this machine, with a breakdown of where eager time goes.

    python benchmarks/latency.py        # the quickstart's teacher and SSIM student (run the quickstart first)

Writes ``benchmarks/results/latency.{json,md,png}``. Every number is images per second through
:class:`detkd.inference.Predictor`: "model" starts from decoded images (resize, network, box decoding,
NMS, mapping back to original pixels), "end to end" from encoded PNG bytes. Medians of ``--repeats``
timed passes over the same images, after a warm-up pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART = Path("runs/quickstart")


def timed(fn, *, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(predictor, images: list[Any], batch: int, *, repeats: int) -> float:
    """Images per second pushing ``images`` through ``predictor`` in batches of ``batch``."""

    def run() -> None:
        for i in range(0, len(images), batch):
            predictor(images[i : i + batch])

    return len(images) / timed(run, repeats=repeats)


def eager_breakdown(predictor, images: list[bytes], *, repeats: int) -> dict[str, float]:
    """Milliseconds per image (batch 1) in each part of an eager FCOS prediction."""
    from detkd.inference import image_tensor
    from detkd.models.detectors import set_inference_thresholds

    model = predictor.backend.model
    set_inference_thresholds(model, score_thresh=predictor.score_thresh, detections_per_img=100)
    decoded = [image_tensor(b) for b in images]
    prepared, scales = predictor.prepare(decoded)
    parts: dict[str, float] = {}

    def part(name, fn) -> None:
        parts[name] = timed(lambda: [fn(i) for i in range(len(images))], repeats=repeats) / len(images) * 1e3

    part("decode PNG", lambda i: image_tensor(images[i]))
    part("resize to input view", lambda i: predictor.prepare([decoded[i]]))
    with torch.inference_mode():
        batches = [model.transform([p])[0] for p in prepared]
        part("normalise + pad", lambda i: model.transform([prepared[i]]))
        features = [list(model.backbone(b.tensors).values()) for b in batches]
        part("backbone + FPN", lambda i: model.backbone(batches[i].tensors))
        heads = [model.head(f) for f in features]
        part("head", lambda i: model.head(features[i]))
        anchors = [model.anchor_generator(b, f) for b, f in zip(batches, features, strict=True)]
        part("anchors", lambda i: model.anchor_generator(batches[i], features[i]))

        def post(i: int):
            counts = [x.size(2) * x.size(3) for x in features[i]]
            split_heads = {k: list(v.split(counts, dim=1)) for k, v in heads[i].items()}
            split_anchors = [list(a.split(counts)) for a in anchors[i]]
            return model.postprocess_detections(split_heads, split_anchors, batches[i].image_sizes)

        part("decode boxes + NMS", post)
        outputs = [model([p])[0] for p in prepared]
        part("map to original pixels", lambda i: predictor.to_original(outputs[i], scales[i]))
        total = timed(lambda: [model([p]) for p in prepared], repeats=repeats) / len(images) * 1e3
    parts["whole forward (for reference)"] = total
    return {k: round(v, 3) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=QUICKSTART / "models/teacher/model.pt")
    parser.add_argument("--student", type=Path, default=QUICKSTART / "models/student_ssim/model.pt")
    parser.add_argument("--images", type=Path, default=QUICKSTART / "data/images/test")
    parser.add_argument("--count", type=int, default=64, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    for path in (args.teacher, args.student):
        if not path.is_file():
            sys.exit(f"error: {path}: no checkpoint; run `detkd run pipelines/quickstart.yaml` first")
    files = sorted(args.images.glob("*.png"))[: args.count]
    if not files:
        sys.exit(f"error: {args.images}: no PNG images")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from detkd.export import export_detector
    from detkd.inference import Predictor, image_tensor

    encoded = [f.read_bytes() for f in files]
    decoded = [image_tensor(b) for b in encoded]
    rows, breakdown = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for name, checkpoint in (("teacher", args.teacher), ("student", args.student)):
            predictors = {"pytorch eager": Predictor.from_checkpoint(checkpoint, score_thresh=0.3)}
            for fmt, backend in (("onnx", "onnx runtime"), ("torchscript", "torchscript")):
                out = Path(folder) / f"{name}.{fmt}"
                export_detector(checkpoint, format=fmt, out=out)
                predictors[backend] = Predictor.from_export(out, score_thresh=0.3)
            size = predictors["pytorch eager"].input_spec.model_size
            for backend, predictor in predictors.items():
                for batch in (1, 8):
                    model_ips = throughput(predictor, decoded, batch, repeats=args.repeats)
                    e2e_ips = throughput(predictor, encoded, batch, repeats=args.repeats)
                    rows.append(
                        {
                            "model": name,
                            "input_px": size,
                            "backend": backend,
                            "batch": batch,
                            "images_per_s": round(model_ips, 1),
                            "end_to_end_images_per_s": round(e2e_ips, 1),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
            breakdown[name] = eager_breakdown(predictors["pytorch eager"], encoded[:16], repeats=args.repeats)
            print(name, json.dumps(breakdown[name]), flush=True)
    ratios = []
    for backend in ("pytorch eager", "onnx runtime", "torchscript"):
        for batch in (1, 8):
            pick = {r["model"]: r for r in rows if r["backend"] == backend and r["batch"] == batch}
            ratios.append(
                {
                    "backend": backend,
                    "batch": batch,
                    "student_over_teacher": round(pick["student"]["images_per_s"] / pick["teacher"]["images_per_s"], 2),
                    "end_to_end": round(
                        pick["student"]["end_to_end_images_per_s"] / pick["teacher"]["end_to_end_images_per_s"], 2
                    ),
                }
            )
    import onnxruntime

    result = {
        "rows": rows,
        "ratios": ratios,
        "eager_breakdown_ms_per_image": breakdown,
        "meta": {
            "command": " ".join(["python", *sys.argv]),
            "images": f"{len(files)} PNGs from {args.images}",
            "threads": args.threads,
            "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, no GPU used",
            "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}",
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, args.out / "latency.md")
    write_plot(result, args.out / "latency.png")
    print(f"written: {args.out / 'latency.json'}, latency.md, latency.png")


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Deployed speed: teacher vs low-resolution student",
        "",
        f"`{result['meta']['command']}` · {result['meta']['images']} · {result['meta']['threads']} threads · "
        f"{result['meta']['machine']} · {result['meta']['versions']}",
        "",
        "| model | input px | backend | batch | images/s (decoded images in) | images/s (PNG bytes in) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['input_px']} | {r['backend']} | {r['batch']} | {r['images_per_s']} | "
            f"{r['end_to_end_images_per_s']} |"
        )
    lines += ["", "| backend | batch | student / teacher | same, PNG bytes in |", "|---|---|---|---|"]
    for r in result["ratios"]:
        lines.append(f"| {r['backend']} | {r['batch']} | {r['student_over_teacher']}x | {r['end_to_end']}x |")
    lines += ["", "Eager PyTorch, batch 1, milliseconds per image:", ""]
    names = list(result["eager_breakdown_ms_per_image"])
    lines.append("| part | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    breakdown = result["eager_breakdown_ms_per_image"]
    for part in breakdown[names[0]]:
        lines.append(f"| {part} | " + " | ".join(str(breakdown[n][part]) for n in names) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4))
    labels, teacher, student = [], [], []
    for backend in ("pytorch eager", "onnx runtime", "torchscript"):
        for batch in (1, 8):
            pick = {r["model"]: r for r in result["rows"] if r["backend"] == backend and r["batch"] == batch}
            labels.append(f"{backend}\nbatch {batch}")
            teacher.append(pick["teacher"]["images_per_s"])
            student.append(pick["student"]["images_per_s"])
    x = range(len(labels))
    axes.bar([i - 0.2 for i in x], teacher, width=0.4, label="teacher (128 px)")
    axes.bar([i + 0.2 for i in x], student, width=0.4, label="student (64 px)")
    axes.set_xticks(list(x), labels, fontsize=8)
    axes.set_ylabel("images / s (CPU)")
    axes.legend()
    axes.set_title("deployed speed, decoded images in")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
