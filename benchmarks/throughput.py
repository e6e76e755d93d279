"""What distillation costs per step, whether the data loader keeps up, and how fast COCO evaluation is.

(a) a student training step, (b) a teacher forward, (c) a full distillation step per
method, and (c) / ((a) + (b)): the overhead of distillation itself (1.0 is the
limit: the losses and adapters would be free). Also data-loader images/s against
what training consumes, and faster-coco-eval against pycocotools on the same
detections. Writes benchmarks/results/throughput.{json,md}.

    python benchmarks/throughput.py        # ~3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from repo_paths import repo_command  # this folder is on sys.path when run
from torch.utils.data import DataLoader

from detkd.config import OptimConfig
from detkd.data.coco import load_coco
from detkd.data.dataset import DetectionDataset, collate_detection
from detkd.data.synth import SynthSpec, synthesize
from detkd.data.transforms import Compose, RandomHorizontalFlip, ResizeShortSide, scale_batch
from detkd.distill.distiller import Distiller, Teacher
from detkd.engine.coco_eval import coco_metrics
from detkd.engine.loop import build_optimizer, train_step
from detkd.models import build_detector
from detkd.models.taps import extract_features

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {"mse": {}, "ssim": {}, "mgd": {}, "dsamkd": {}, "msad": {"ramp_iters": 0}}


def timed(fn, *, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def student_model():
    torch.manual_seed(0)
    return build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=2, max_level=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="detkd-throughput-"))
    synthesize(work, SynthSpec(images=400, size=128, seed=0, val_fraction=0.5))
    train = load_coco(work / "annotations/instances_train.json", work / "images/train")
    dataset = DetectionDataset(train, transform=Compose([ResizeShortSide(128), RandomHorizontalFlip(0.5)]))
    images, targets = collate_detection([dataset[i] for i in range(args.batch)])
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    s_images, s_targets = scale_batch(images, targets, factor=0.5)
    s_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in s_targets]
    device = torch.device("cpu")
    optim = OptimConfig()

    student = student_model().train()
    opt = build_optimizer(student.parameters(), optim, lr=1e-4)

    def step() -> None:
        train_step(
            student, s_images, s_targets, optimizer=opt, scaler=None, device=device, amp=False, clip_grad_norm=10.0
        )

    t_student = timed(step, repeats=args.repeats)

    torch.manual_seed(1)
    teacher = build_detector(arch="fcos", backbone="tiny", num_classes=3, min_level=3, max_level=7).eval()
    torch.manual_seed(1)
    ms_teacher = build_detector(
        arch="fcos", backbone="tiny", num_classes=3, min_level=3, max_level=7, multiscale=True
    ).eval()

    def forward(model, logits: bool):
        with torch.no_grad():
            extract_features(model, images, logits=logits)

    t_teacher = timed(lambda: forward(teacher, False), repeats=args.repeats)
    t_teacher_logits = timed(lambda: forward(teacher, True), repeats=args.repeats)
    t_ms_teacher = timed(lambda: forward(ms_teacher, False), repeats=args.repeats)
    rows = []
    for name, settings in METHODS.items():
        chosen = ms_teacher if name == "msad" else teacher
        distiller = Distiller(
            student=student_model(),
            student_scale=0.5,
            teachers=[Teacher(chosen, 1.0)],
            methods={name: {"teacher": 0, **settings}},
        ).train()
        # the teacher forward the method needs: features, plus the class head for logit losses
        needs_logits = any(loss.uses_logits for loss in distiller.losses.values())
        d_opt = build_optimizer(distiller.parameters(), optim, lr=1e-4)
        t_full = timed(
            lambda d=distiller, o=d_opt: train_step(
                d, images, targets, optimizer=o, scaler=None, device=device, amp=False, clip_grad_norm=10.0
            ),
            repeats=args.repeats,
        )
        t_base = t_student + (t_ms_teacher if name == "msad" else t_teacher_logits if needs_logits else t_teacher)
        rows.append({"method": name, "step_s": t_full, "student_plus_teacher_s": t_base, "ratio": t_full / t_base})

    loader_rates = {}
    for workers in (0, 2):
        loader = DataLoader(
            dataset, batch_size=args.batch, shuffle=True, collate_fn=collate_detection, num_workers=workers
        )
        start, seen = time.perf_counter(), 0
        for batch_images, _ in loader:
            seen += len(batch_images)
        loader_rates[str(workers)] = seen / (time.perf_counter() - start)
    train_rate = args.batch / t_student

    val = load_coco(work / "annotations/instances_val.json", work / "images/val")
    gt = val.to_coco_dict()
    rng = np.random.default_rng(0)
    dets = []
    for ann in gt["annotations"]:
        for _ in range(20):  # 20 noisy candidates per object, like a detector's pre-NMS-ish output
            x, y, w, h = ann["bbox"]
            j = rng.normal(0, 0.15 * max(w, h), 4)
            dets.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": ann["category_id"],
                    "score": float(rng.random()),
                    "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                }
            )
    eval_times = {}
    for backend in ("faster", "pycocotools"):
        eval_times[backend] = timed(lambda b=backend: coco_metrics(gt, dets, backend=b), repeats=3, warmup=1)
    same = coco_metrics(gt, dets, backend="faster") == coco_metrics(gt, dets, backend="pycocotools")

    result = {
        "command": repo_command(),
        "batch": args.batch,
        "repeats": args.repeats,
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch {torch.__version__}",
        "student_step_s": t_student,
        "teacher_forward_s": t_teacher,
        "teacher_forward_with_logits_s": t_teacher_logits,
        "msad_teacher_forward_s": t_ms_teacher,
        "methods": rows,
        "loader_images_per_s": loader_rates,
        "training_images_per_s": train_rate,
        "coco_eval_s": eval_times,
        "coco_eval_detections": len(dets),
        "coco_eval_images": len(gt["images"]),
        "coco_eval_identical": same,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [
        "# Step costs, data loading and evaluation",
        "",
        f"Command: `{r['command']}`; machine: {r['machine']}; batch {r['batch']} (student 64 px, teacher 128 px,",
        f"tiny FCOS); medians of {r['repeats']} timed calls.",
        "",
        f"* (a) student training step: {r['student_step_s'] * 1000:.0f} ms",
        f"* (b) teacher forward, no decoding: features {r['teacher_forward_s'] * 1000:.0f} ms, features + class "
        f"logits {r['teacher_forward_with_logits_s'] * 1000:.0f} ms (what dsamkd needs); multi-scale MSAD teacher "
        f"(fused features): {r['msad_teacher_forward_s'] * 1000:.0f} ms",
        "",
        "| method | (c) distillation step | (a) + (b) | overhead (c) / ((a) + (b)) |",
        "|---|---|---|---|",
    ]
    for row in r["methods"]:
        lines.append(
            f"| {row['method']} | {row['step_s'] * 1000:.0f} ms | {row['student_plus_teacher_s'] * 1000:.0f} ms"
            f" | {row['ratio']:.2f} |"
        )
    lines += [
        "",
        f"Data loader: {r['loader_images_per_s']['0']:.0f} images/s in-process, "
        f"{r['loader_images_per_s']['2']:.0f} images/s with 2 worker processes; the student step consumes "
        f"{r['training_images_per_s']:.0f} images/s.",
        "",
        f"COCO evaluation of {r['coco_eval_detections']} detections on {r['coco_eval_images']} images: "
        f"faster-coco-eval {r['coco_eval_s']['faster']:.2f} s, pycocotools {r['coco_eval_s']['pycocotools']:.2f} s "
        f"({r['coco_eval_s']['pycocotools'] / r['coco_eval_s']['faster']:.1f}x); identical metrics: "
        f"{r['coco_eval_identical']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
