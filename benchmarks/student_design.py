"""How narrow can the half-resolution student be? Accuracy and deployed speed of student designs.

A 64 px student that shifts its pyramid down one level (P2-P6) has feature maps of the
teacher's sizes and, with the teacher's 64-channel neck and head ("wide", the quickstart's
student before it became ``lite``), a head that costs the teacher's 104 MFLOP: a quarter of the
pixels buys almost no speed. This trains
each design below at 64 px on the quickstart data, without distillation and with SSIM from the
quickstart teacher, over several seeds, scores them on the held-out test split, and measures
each design's images/s against the teacher's (ONNX Runtime and eager PyTorch, batch 1, each in
its own process, as ``latency.py`` does).

    detkd run pipelines/quickstart.yaml          # first: the teacher and the data
    python benchmarks/student_design.py          # ~40 min on 2 CPU cores (--parallel 2: ~30)
    python benchmarks/student_design.py --designs lite --epochs 16 --workdir runs/student_design_16ep

Writes ``benchmarks/results/student_design.{json,md,png}``. Reruns reuse trained students
(the pipeline skips finished models), so an interrupted run continues; give ``--epochs`` runs
their own ``--workdir`` so they do not meet students trained on another schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from latency import measure_rounds, network_flops  # this folder is on sys.path when run
from repo_paths import repo_command  # this folder is on sys.path when run

RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART_SPEC = Path("pipelines/quickstart.yaml")
QUICKSTART = Path("runs/quickstart")
HALF = {"input": {"scale": 0.5}, "model": {"min_level": 2, "max_level": 6}}
DESIGNS: dict[str, dict[str, Any]] = {
    # design -> model settings over HALF; "wide" is the teacher's neck and head
    "wide": {"fpn_channels": 64, "head_convs": 2},
    "narrow": {"fpn_channels": 32, "head_convs": 2},
    "narrow_1conv": {"fpn_channels": 32, "head_convs": 1},
    # unshifted: P3-P6 at 64 px, so the head runs on a quarter of the shifted pyramid's cells
    # (student P3 pairs with teacher P4 by footprint); P2's 16 x 16 map is gone
    "wide_p3": {"fpn_channels": 64, "head_convs": 2, "min_level": 3},
    "narrow_p3": {"fpn_channels": 32, "head_convs": 2, "min_level": 3},
    # detkd.models.lite: separable FPN and one shared separable head tower with per-level BatchNorm, on
    # P2-P4 (at 64 px FCOS assigns every object of this data to P2; P5-P6 only cost time)
    "lite": {"fpn_channels": 64, "head_convs": 2, "design": "lite", "max_level": 4},
    "lite_deep": {"fpn_channels": 64, "head_convs": 4, "design": "lite", "max_level": 4},
    "lite_wide": {"fpn_channels": 128, "head_convs": 2, "design": "lite", "max_level": 4},
}
METHODS = {"baseline": None, "ssim": {"ssim": {"weight": 3.0}}}  # the quickstart's SSIM weight
SPEED_BACKENDS = ("onnx runtime", "pytorch eager")


def spec_for(
    teacher: Path, workdir: Path, designs: list[str], seeds: list[int], *, epochs: int | None = None
) -> dict[str, Any]:
    """The quickstart spec with its teacher given as a checkpoint and one student per design x method x seed
    (trained for ``epochs`` instead of the quickstart's ``defaults.train.epochs`` when given)."""
    spec = yaml.safe_load(QUICKSTART_SPEC.read_text())
    spec.pop("register", None)
    spec.update(name="student_design", workdir=str(workdir), teachers=[])
    spec["tracking"] = {"experiment": "detkd-student-design"}
    students = []
    for design in designs:
        for method, distill in METHODS.items():
            for seed in seeds:
                settings: dict[str, Any] = {
                    "seed": seed,
                    "input": dict(HALF["input"]),
                    "model": {**HALF["model"], **DESIGNS[design]},
                }
                if epochs is not None:
                    settings["train"] = {"epochs": epochs}
                if distill is not None:
                    settings["distill"] = {"teachers": [{"source": str(teacher)}], **distill}
                students.append({"name": f"{design}_{method}_s{seed}", "settings": settings})
    spec["students"] = students
    return spec


def quickstart_teacher_ap() -> float | None:
    summary = QUICKSTART / "summary.json"
    if not summary.is_file():
        return None
    return next((row["AP"] for row in json.loads(summary.read_text()) if row["name"] == "teacher"), None)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=QUICKSTART / "models/teacher/model.pt")
    parser.add_argument("--designs", nargs="+", choices=list(DESIGNS), default=list(DESIGNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="student epochs (default: the quickstart's defaults.train.epochs)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/student_design"))
    parser.add_argument("--images", type=Path, default=QUICKSTART / "data/images/test", help="PNGs timed for speed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="speed: turns over all models (medians)")
    parser.add_argument("--parallel", type=int, default=1, help="students trained side by side (detkd run --parallel)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.teacher.is_file():
        sys.exit(f"error: {args.teacher}: no teacher checkpoint; run `detkd run pipelines/quickstart.yaml` first")

    from detkd.config import validate_config
    from detkd.pipeline.runner import run_pipeline
    from detkd.pipeline.spec import PipelineSpec

    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    raw = spec_for(args.teacher.resolve(), args.workdir, args.designs, args.seeds, epochs=args.epochs)
    epochs = args.epochs if args.epochs is not None else raw["defaults"]["train"]["epochs"]
    spec = validate_config(raw, source="student_design spec", model=PipelineSpec)
    started = time.perf_counter()
    rows = {row.name: row.to_dict() for row in run_pipeline(spec, parallel=args.parallel)}
    train_minutes = (time.perf_counter() - started) / 60
    import ray

    ray.shutdown()  # the local cluster's daemons would share the 2 cores with the timed processes

    models = {"teacher": args.teacher}
    models |= {d: args.workdir / "models" / f"{d}_ssim_s{args.seeds[0]}" / "model.pt" for d in args.designs}
    flops = {name: network_flops(checkpoint) for name, checkpoint in models.items()}
    measured = measure_rounds(models, SPEED_BACKENDS, args.images, count=64, repeats=args.repeats, rounds=args.rounds)
    speed: dict[str, dict[str, float]] = {name: {} for name in models}
    for (name, backend), result in measured.items():
        speed[name][backend] = next(r["images_per_s"] for r in result["rows"] if r["batch"] == 1)
        print(json.dumps({"model": name, "backend": backend, "images_per_s": speed[name][backend]}), flush=True)

    designs = []
    for design in args.designs:
        settings = {**HALF["model"], **DESIGNS[design]}
        entry: dict[str, Any] = {
            "design": design,
            "fcos_design": settings.get("design", "standard"),
            "levels": f"P{settings['min_level']}-P{settings['max_level']}",
            "fpn_channels": settings["fpn_channels"],
            "head_convs": settings["head_convs"],
        }
        for method in METHODS:
            aps = [rows[f"{design}_{method}_s{seed}"]["AP"] for seed in args.seeds]
            entry[f"{method}_ap"] = [round(v, 4) for v in mean_std(aps)]
            entry[f"{method}_ap_by_seed"] = aps
        entry["mflop"] = round(flops[design]["backbone_fpn_mflop"] + flops[design]["head_mflop"], 1)
        for backend in SPEED_BACKENDS:
            entry[f"{backend} images/s"] = speed[design][backend]
            entry[f"{backend} x teacher"] = round(speed[design][backend] / speed["teacher"][backend], 2)
        designs.append(entry)
    import torch

    result = {
        "designs": designs,
        "teacher": {
            "mflop": round(flops["teacher"]["backbone_fpn_mflop"] + flops["teacher"]["head_mflop"], 1),
            **{f"{b} images/s": speed["teacher"][b] for b in SPEED_BACKENDS},
            "test_ap": quickstart_teacher_ap(),
        },
        "flops": flops,
        "meta": {
            "command": repo_command(),
            "seeds": args.seeds,
            "epochs": epochs,
            "speed_rounds": args.rounds,
            "train_minutes": round(train_minutes, 1),
            "threads": torch.get_num_threads(),
            "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, no GPU used",
            "versions": f"python {platform.python_version()}, torch {torch.__version__}",
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "student_design.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, args.out / "student_design.md")
    write_plot(result, args.out / "student_design.png")
    print(f"written: {args.out / 'student_design.json'}, student_design.md, student_design.png")


def write_markdown(result: dict, path: Path) -> None:
    meta, teacher = result["meta"], result["teacher"]
    lines = [
        "# Student design: accuracy and deployed speed of the 64 px student",
        "",
        f"`{meta['command']}` · seeds {meta['seeds']} · {meta.get('epochs', 8)} student epochs · "
        f"training {meta['train_minutes']} min · "
        f"{meta['threads']} threads · {meta['machine']} · {meta['versions']}",
        "",
        "Every student sees the 128 px quickstart images at 64 px with its pyramid shifted down one level "
        "(P2 pairs with the teacher's P3; designs ending in `_p3` keep P3-P6 unshifted); `lite` designs are "
        "`model.design: lite` (separable FPN and one shared separable head tower with per-level BatchNorm). "
        "Test AP (150 held-out images) mean ± std over seeds; images/s at batch 1 from decoded "
        "images through `Predictor` (resize, network, box decoding, NMS, mapping back), the median of "
        f"{meta.get('speed_rounds', 1)} turns over all models, each model and backend in its own process.",
        "",
        f"Teacher (128 px, fpn 64, 2 head convs): {teacher['mflop']} MFLOP, "
        f"ONNX Runtime {teacher['onnx runtime images/s']} images/s, eager {teacher['pytorch eager images/s']}"
        + (f", test AP {teacher['test_ap']:.3f} (quickstart summary)" if teacher["test_ap"] is not None else ""),
        "",
        "| design | model.design | levels | fpn channels | head convs | MFLOP | AP, no distillation | AP, SSIM | "
        "ONNX Runtime images/s | x teacher | eager images/s | x teacher |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in result["designs"]:
        lines.append(
            f"| {d['design']} | {d['fcos_design']} | {d['levels']} | {d['fpn_channels']} | {d['head_convs']} | "
            f"{d['mflop']} | "
            f"{d['baseline_ap'][0]:.3f} ± {d['baseline_ap'][1]:.3f} | {d['ssim_ap'][0]:.3f} ± {d['ssim_ap'][1]:.3f} | "
            f"{d['onnx runtime images/s']} | {d['onnx runtime x teacher']}x | "
            f"{d['pytorch eager images/s']} | {d['pytorch eager x teacher']}x |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    palette = plt.get_cmap("tab20")  # one hue per design (dark: no distillation, light: SSIM)
    for index, d in enumerate(result["designs"]):
        for shade, (method, marker) in enumerate((("baseline", "o"), ("ssim", "s"))):
            mean, std = d[f"{method}_ap"]
            label = f"{d['design']} {method}"
            color = palette((2 * index + shade) % 20)
            axes.errorbar(d["onnx runtime x teacher"], mean, yerr=std, fmt=marker, color=color, capsize=3, label=label)
    if result["teacher"]["test_ap"] is not None:
        axes.axhline(result["teacher"]["test_ap"], color="grey", linestyle="--", label="teacher (128 px)")
    axes.axvline(3.0, color="grey", linestyle=":", label="3x the teacher")
    axes.set_xlabel("images/s relative to the teacher (ONNX Runtime, batch 1, CPU)")
    axes.set_ylabel("test AP")
    axes.set_title("64 px students: accuracy against deployed speed")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    import logging

    logging.basicConfig(format="%(message)s", stream=sys.stdout)  # the library's progress lines, as print gave
    logging.getLogger("detkd").setLevel(logging.INFO)
    main()
