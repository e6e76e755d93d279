"""Deployed speed of a teacher and its low-resolution student: PyTorch eager against ONNX Runtime
(and TorchScript), at batch 1 and 8, on this machine, with a breakdown of where eager time goes.

    python benchmarks/latency.py        # the quickstart's teacher and SSIM student (run the quickstart first)

Writes ``benchmarks/results/latency.{json,md,png}``. Every number is images per second through
:class:`detkd.serving.predictor.Predictor`: "model" starts from decoded images (resize, network, box decoding,
NMS, mapping back to original pixels), "end to end" from encoded PNG bytes. Medians of ``--repeats``
timed passes over the same images, after a warm-up pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from repo_paths import repo_command, repo_path  # this folder is on sys.path when run
from throughput import timed  # the benchmarks' one timing helper (this folder is on sys.path when run)

RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART = Path("runs/quickstart")
BACKENDS = ("pytorch eager", "onnx runtime", "torchscript")
# the serving threshold, applied before NMS in every backend: exported graphs are exported with it, as
# `detkd export --score-threshold 0.3` would be for this service (a graph exported at 0.05 runs NMS
# over every weak candidate and drops them afterwards: 1.3x slower for the student here)
SCORE_THRESH = 0.3


def throughput(predictor, images: list[Any], batch: int, *, repeats: int) -> float:
    """Images per second pushing ``images`` through ``predictor`` in batches of ``batch``."""

    def run() -> None:
        for i in range(0, len(images), batch):
            predictor(images[i : i + batch])

    return len(images) / timed(run, repeats=repeats, warmup=1)


def eager_breakdown(predictor, images: list[bytes], *, repeats: int) -> dict[str, float]:
    """Milliseconds per image (batch 1) in each part of an eager FCOS prediction."""
    from detkd.models.detectors import set_inference_thresholds
    from detkd.serving.predictor import image_tensor

    model = predictor.backend.model
    set_inference_thresholds(model, score_thresh=predictor.score_thresh, detections_per_img=100)
    decoded = [image_tensor(b) for b in images]
    prepared, scales = predictor.prepare(decoded)
    parts: dict[str, float] = {}

    def part(name, fn) -> None:
        parts[name] = timed(lambda: [fn(i) for i in range(len(images))], repeats=repeats, warmup=1) / len(images) * 1e3

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
        total = timed(lambda: [model([p]) for p in prepared], repeats=repeats, warmup=1) / len(images) * 1e3
    parts["whole forward (for reference)"] = total
    return {k: round(v, 3) for k, v in parts.items()}


def measure(model: str, checkpoint: Path, backend: str, files: list[Path], *, repeats: int) -> dict[str, Any]:
    """One model through one backend, in this process alone (see ``main``)."""
    from detkd.serving.export import export_detector
    from detkd.serving.predictor import Predictor, image_tensor

    encoded = [f.read_bytes() for f in files]
    decoded = [image_tensor(b) for b in encoded]
    with tempfile.TemporaryDirectory() as folder:
        if backend == "pytorch eager":
            predictor = Predictor.from_checkpoint(checkpoint, score_thresh=SCORE_THRESH)
        else:
            fmt = "onnx" if backend == "onnx runtime" else "torchscript"
            export_detector(checkpoint, format=fmt, out=Path(folder) / f"model.{fmt}", score_thresh=SCORE_THRESH)
            predictor = Predictor.from_export(Path(folder) / f"model.{fmt}", score_thresh=SCORE_THRESH)
        rows = []
        for batch in (1, 8):
            rows.append(
                {
                    "model": model,
                    "input_px": predictor.input_spec.model_size,
                    "backend": backend,
                    "batch": batch,
                    "images_per_s": round(throughput(predictor, decoded, batch, repeats=repeats), 1),
                    "end_to_end_images_per_s": round(throughput(predictor, encoded, batch, repeats=repeats), 1),
                }
            )
        breakdown = eager_breakdown(predictor, encoded[:16], repeats=repeats) if backend == "pytorch eager" else None
    return {"rows": rows, "breakdown": breakdown}


def measure_apart(
    model: str, checkpoint: Path, backend: str, images: Path, *, count: int, repeats: int
) -> dict[str, Any]:
    """:func:`measure` in a fresh process: PyTorch's OpenMP threads keep spinning after eager work and
    would slow an ONNX Runtime session measured next in the same process."""
    command = [sys.executable, __file__, "--images", str(images), "--count", str(count)]
    command += ["--repeats", str(repeats), "--one", model, str(checkpoint), backend]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: measuring {model} with {backend} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_rounds(
    models: dict[str, Path], backends: tuple[str, ...], images: Path, *, count: int, repeats: int, rounds: int
) -> dict[tuple[str, str], dict[str, Any]]:
    """:func:`measure_apart` for every model and backend, ``rounds`` times in turn; each row's median.

    This shared machine's speed drifts by tens of percent over minutes, so measuring the teacher
    once and then each student would put that drift into their ratio; taking turns spreads it
    evenly and the median drops the passes that caught a slow spell."""
    passes: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for name, checkpoint in models.items():
            for backend in backends:
                measured = measure_apart(name, checkpoint, backend, images, count=count, repeats=repeats)
                passes.setdefault((name, backend), []).append(measured)
    out = {}
    for key, runs in passes.items():
        rows = []
        for index, row in enumerate(runs[0]["rows"]):
            median = {
                field: round(statistics.median(run["rows"][index][field] for run in runs), 1)
                for field in ("images_per_s", "end_to_end_images_per_s")
            }
            rows.append(row | median)
        out[key] = {"rows": rows, "breakdown": runs[0]["breakdown"]}
    return out


def network_flops(checkpoint: Path) -> dict[str, float]:
    """MFLOPs of backbone + FPN and of the head on one image at the model's input size."""
    from torch.utils.flop_counter import FlopCounterMode

    from detkd.serving.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint)
    model, size = predictor.backend.model, predictor.input_spec.model_size
    with torch.inference_mode():
        batch = model.transform([torch.rand(3, size, size)])[0]
        with FlopCounterMode(display=False) as counter:
            features = model.backbone(batch.tensors)
        backbone = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.head(list(features.values()))
        head = counter.get_total_flops()
    return {
        "backbone_fpn_mflop": round(backbone / 1e6, 1),
        "head_mflop": round(head / 1e6, 1),
        "levels": {name: list(f.shape[-2:]) for name, f in features.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=QUICKSTART / "models/teacher/model.pt")
    parser.add_argument("--student", type=Path, default=QUICKSTART / "models/student_ssim/model.pt")
    parser.add_argument("--images", type=Path, default=QUICKSTART / "data/images/test")
    parser.add_argument("--count", type=int, default=64, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="turns over all models and backends (medians)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "CHECKPOINT", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    files = sorted(args.images.glob("*.png"))[: args.count]
    if args.one:  # a worker process: one model, one backend
        model, checkpoint, backend = args.one
        print(json.dumps(measure(model, Path(checkpoint), backend, files, repeats=args.repeats)))
        return
    for path in (args.teacher, args.student):
        if not path.is_file():
            sys.exit(f"error: {path}: no checkpoint; run `detkd run pipelines/quickstart.yaml` first")
    if not files:
        sys.exit(f"error: {args.images}: no PNG images")
    rows, breakdown = [], {}
    models = {"teacher": args.teacher, "student": args.student}
    flops = {name: network_flops(checkpoint) for name, checkpoint in models.items()}
    measured = measure_rounds(models, BACKENDS, args.images, count=args.count, repeats=args.repeats, rounds=args.rounds)
    for (name, _), result in measured.items():
        rows += result["rows"]
        if result["breakdown"]:
            breakdown[name] = result["breakdown"]
        for row in result["rows"]:
            print(json.dumps(row), flush=True)
    ratios = []
    for backend in BACKENDS:
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
        "flops": flops,
        "meta": {
            "command": repo_command(),
            "images": f"{len(files)} PNGs from {repo_path(args.images)}",
            "rounds": args.rounds,
            "threads": torch.get_num_threads(),
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
        f"{result['meta']['machine']} · {result['meta']['versions']} · score threshold {SCORE_THRESH} before NMS "
        "in every backend (exported graphs exported with it)",
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
    lines += ["", "Network cost per image (torch.utils.flop_counter):", ""]
    lines += ["| model | feature maps | backbone + FPN MFLOP | head MFLOP |", "|---|---|---|---|"]
    for name, f in result["flops"].items():
        maps = ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in f["levels"].items())
        lines.append(f"| {name} | {maps} | {f['backbone_fpn_mflop']} | {f['head_mflop']} |")
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
