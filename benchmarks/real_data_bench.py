"""Real data: a pretrained teacher fine-tuned on your photos, distilled into a low-resolution student, every method.

One command from a dataset folder and a local weight file (nothing is downloaded):

    python benchmarks/real_data_bench.py --data DATA --weights fcos_resnet50_fpn_coco-99b0c9b7.pth --budget gpu

DATA is a YOLO ``data.yaml``, a Pascal VOC folder, or a COCO JSON with ``--images`` (its held-out split is read
off the data as ``detkd distill --teacher --data`` does). The teacher is torchvision's ``--torchvision`` detector
(``detkd models torchvision-config NAME``: its network, frozen BatchNorm, the top 3 backbone stages trained)
loaded from ``--weights`` with its class layers re-initialised for your classes; an MSAD multi-scale copy of it
is fine-tuned the same way for the ``msad`` row. Every model trains with the box-aware augmentation below and
weight EMA. Students are detkd's ``lite`` FCOS at half resolution (``student_hr``: the same at full resolution),
once per seed: the undistilled baseline, then mse, ssim, mgd, dsamkd and msad. Results (mean +- std over
seeds, gain over the baseline, on the held-out split) go to ``benchmarks/results/real_data_<budget>.{md,json,png}``
and to the pipeline's MLflow parent run.

Budgets: ``gpu`` is the measurement (one GPU, 512 px teacher view, 3 seeds); ``cpu_smoke`` runs the same
recipe for two steps per model at 96 px on a CPU, which checks the command end to end and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from distill_bench import log_results, plot, summarise  # this folder is on sys.path when run
from repo_paths import repo_command, repo_path

RESULTS = Path(__file__).resolve().parent / "results"

BUDGETS = {
    "gpu": {
        "size": 512, "max_size": 853, "teacher_epochs": 24, "epochs": 36, "batch_size": 16, "max_steps": None,
        "seeds": [0, 1, 2], "scaling": {"use_gpu": True}, "loader_workers": 4, "ema_warmup": 2000,
    },
    "cpu_smoke": {
        "size": 96, "max_size": 160, "teacher_epochs": 1, "epochs": 1, "batch_size": 2, "max_steps": 2,
        "seeds": [0], "scaling": {}, "loader_workers": 0, "ema_warmup": 0,
    },
}  # fmt: skip


def _kd(method: str, teacher: str = "teacher") -> dict:
    return {"distill": {"teachers": [{"source": teacher}], method: {}}}


# (row, what it is, settings over the half-resolution student)
ROWS: list[tuple[str, str, dict]] = [
    ("student_hr", "upper reference: the student at the teacher's resolution", {"input": {"scale": 1.0}}),
    ("baseline", "half resolution, no distillation", {}),
    ("mse", "feature MSE", _kd("mse")),
    ("ssim", "SSIM structural features", _kd("ssim")),
    ("mgd", "masked generative distillation", _kd("mgd")),
    ("dsamkd", "scale-aware masked features + logits", _kd("dsamkd")),
    ("msad", "multi-scale aligned teacher, fused-pyramid L1", _kd("msad", "teacher_msad")),
]


def augment(size: int) -> dict:
    """Scale jitter around the teacher's view, SSD's photometric distortion and the flip."""
    return {
        "hflip": 0.5,
        "scale_jitter": {"short_side": [round(0.8 * size), round(1.2 * size)]},
        "photometric": {"p": 0.5},
    }


def build_spec(args: argparse.Namespace, budget: dict, workdir: str) -> dict:
    from detkd.models.torchvision_zoo import torchvision_model_config
    from detkd.pipeline.from_teacher import STUDENTS, data_section

    data = data_section(args.data, images=args.images, val=args.val, val_images=args.val_images, workdir=Path(workdir))

    teacher_model = {**torchvision_model_config(args.torchvision), "weights": str(Path(args.weights).resolve())}
    student = STUDENTS[args.student]  # set per student: the teacher's model section replaces nothing of it
    half = {"input": {"scale": 0.5}, "model": {**student, "min_level": 2, "max_level": 6}}
    students = []
    for name, _, settings in ROWS:
        for seed in budget["seeds"]:
            merged = json.loads(json.dumps(half))
            for key, value in settings.items():
                merged[key] = {**merged.get(key, {}), **value}
            if name == "student_hr":
                merged["model"] = {**student, "min_level": 3, "max_level": 7}
            merged["seed"] = seed
            students.append({"name": f"{name}-s{seed}", "settings": merged})
    train = {
        "batch_size": budget["batch_size"],
        "log_every": 50,
        "ema": {"decay": 0.9998, "warmup": budget["ema_warmup"]},
    }
    if budget["max_steps"]:
        train["max_steps"] = budget["max_steps"]
    teacher = {
        "model": teacher_model,
        "train": {"epochs": budget["teacher_epochs"]},
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "warmup_iters": 500},
    }
    return {
        "name": "real_data_bench",
        "workdir": workdir,
        "tracking": {"experiment": "detkd-real-data-bench"},
        "data": data,
        "defaults": {
            "input": {"size": budget["size"], "max_size": budget["max_size"], "augment": augment(budget["size"])},
            "optim": {"name": "adamw", "lr": 0.002, "warmup_iters": 200, "schedule": "cosine"},
            "train": {**train, "epochs": budget["epochs"]},
            "data": {"loader_workers": budget["loader_workers"]},
            "scaling": budget["scaling"],
            "tracking": {"log_model": False},
        },
        "teachers": [
            {"name": "teacher", "settings": teacher},
            {
                "name": "teacher_msad",
                "settings": {**teacher, "model": {**teacher_model, "multiscale": True, "low_res_scale": 0.5}},
            },
        ],
        "students": students,
    }  # fmt: skip


def markdown(table: list[dict], meta: dict) -> str:
    lines = [
        f"# Real-data distillation benchmark ({meta['budget']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Budget: {meta['budget_settings']}; wall time {meta['wall_s'] / 60:.0f} min.  ",
        f"Machine: {meta['machine']}; versions: {meta['versions']}.  ",
        f"Teacher: torchvision {meta['torchvision']} fine-tuned from {meta['weights']}; students: {meta['student']}.",
        f"Scores on the held-out split ({meta['split']}), mean +- std over seeds {meta['seeds']}; gain = difference",
        "to the half-resolution baseline.",
        "",
        *([meta["note"], ""] if meta.get("note") else []),
        "| row | method | input | AP | AP50 | APs | gain AP |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['row']} | {e['method']} | {e['input_size']} | {e['AP']:.4f} +- {e['AP_std']:.4f} | "
            f"{e['AP50']:.4f} +- {e['AP50_std']:.4f} | {e['APs']:.4f} +- {e['APs_std']:.4f} | {e['AP_gain']:+.4f} |"
        )
    lines += ["", "Rows: " + "; ".join(f"**{e['row']}**: {e['what']}" for e in table), ""]
    teachers = [f"{t['name']} AP {t['AP']:.4f} at {t['input_size']} px" for t in meta["teachers"]]
    lines += [f"Teachers (one run each): {'; '.join(teachers)}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a YOLO data.yaml, a VOC folder or a COCO JSON")
    parser.add_argument("--images", type=Path, help="the image folder of a COCO --data file")
    parser.add_argument("--val", type=Path, help="COCO: a held-out JSON (default: every 5th image of --data)")
    parser.add_argument("--val-images", type=Path)
    parser.add_argument("--weights", type=Path, required=True, help="the torchvision detection file (local)")
    parser.add_argument("--torchvision", default="fcos_resnet50_fpn", help="which torchvision detector --weights is")
    parser.add_argument("--student", default="lite", help="a `detkd distill --student` preset")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="gpu")
    parser.add_argument("--workdir", type=Path, default=Path("runs/real_data_bench"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.weights.is_file():
        parser.error(f"--weights {args.weights}: file not found (nothing is downloaded: pass a local file)")
    import ray
    import torch

    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import run_pipeline
    from detkd.pipeline.spec import data_splits

    budget = BUDGETS[args.budget]
    stem = args.out / f"real_data_{args.budget}"
    args.out.mkdir(parents=True, exist_ok=True)
    spec_path = args.workdir.resolve() / "pipeline.json"  # absolute data paths: a working file, not a result
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(build_spec(args, budget, str(args.workdir.resolve())), indent=1))
    spec = load_pipeline(spec_path)
    start = time.perf_counter()
    rows = [row.to_dict() for row in run_pipeline(spec)]
    table = summarise(rows, budget["seeds"], ROWS)
    meta = {
        "command": repo_command(),
        "budget": args.budget,
        "budget_settings": budget,
        "wall_s": time.perf_counter() - start,
        "seeds": budget["seeds"],
        "torchvision": args.torchvision,
        "weights": args.weights.name,
        "student": args.student,
        "split": data_splits(spec).scoring()[0],
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}",
        "note": "A smoke run: two steps per model, it measures nothing." if args.budget == "cpu_smoke" else "",
        "workdir": repo_path(args.workdir),
        "teachers": [row for row in rows if row["role"] == "teacher"],
    }
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "table": table, "rows": rows}, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown(table, meta))
    plot(table, Path(f"{stem}.png"), title=f"Real data ({args.budget}): half-resolution students")
    log_results(stem, spec.tracking.experiment)
    print(markdown(table, meta))


if __name__ == "__main__":
    import logging
    import sys

    logging.basicConfig(format="%(message)s", stream=sys.stdout)  # the library's progress lines
    logging.getLogger("detkd").setLevel(logging.INFO)
    main()
