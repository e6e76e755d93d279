"""Every distillation method against its baseline, at a fixed training budget, over several seeds.

Builds one pipeline spec (teachers once, every student row once per seed) on a
synthetic small-object dataset where half resolution hurts, runs it with
``detkd.pipeline.runner.run_pipeline`` (so everything is in MLflow), then writes a
Markdown table (mean +- std over seeds, gain over the half-resolution baseline)
and a plot under benchmarks/results/.

    python benchmarks/distill_bench.py --budget small      # ~1 hour on 2 CPU cores
    python benchmarks/distill_bench.py --budget large      # for a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from repo_paths import repo_command, repo_path  # this folder is on sys.path when run

RESULTS = Path(__file__).resolve().parent / "results"

BUDGETS = {
    # images, student epochs, teacher epochs, seeds
    "small": {"images": 1200, "epochs": 8, "teacher_epochs": 12, "seeds": [0, 1, 2]},
    "large": {"images": 8000, "epochs": 24, "teacher_epochs": 36, "seeds": [0, 1, 2, 3, 4]},
}
HALF = {"input": {"scale": 0.5}, "model": {"min_level": 2, "max_level": 6}}

# (row name, what it is, settings over HALF). Teachers are named in the spec below.
ROWS: list[tuple[str, str, dict]] = [
    (
        "student_hr",
        "upper reference: same student at full resolution",
        {"input": {"scale": 1.0}, "model": {"min_level": 3, "max_level": 7}},
    ),
    ("baseline", "half resolution, no distillation (kd_off)", {}),
    ("mse", "feature MSE from the 128 px teacher", {"distill": {"teachers": [{"source": "teacher"}], "mse": {}}}),
    ("ssim", "SSIM structural features", {"distill": {"teachers": [{"source": "teacher"}], "ssim": {}}}),
    ("mgd", "masked generative distillation", {"distill": {"teachers": [{"source": "teacher"}], "mgd": {}}}),
    (
        "dsamkd",
        "scale-aware masked features + logits (our reading), feature_weight 2e-5 (MGD's alpha)",
        {"distill": {"teachers": [{"source": "teacher"}], "dsamkd": {"feature_weight": 2e-5}}},
    ),
    (
        "dsamkd_rescaled",
        "dsamkd with feature_weight 2e-6: its feature term matched to MGD's scale on the training split",
        {"distill": {"teachers": [{"source": "teacher"}], "dsamkd": {"feature_weight": 2e-6}}},
    ),
    (
        "msad",
        "multi-scale aligned teacher, fused-pyramid L1, init from teacher",
        {"distill": {"teachers": [{"source": "teacher_msad"}], "msad": {}, "init_from_teacher": True}},
    ),
    (
        "msad_noinit",
        "msad without init_from_teacher: what the fused-pyramid loss alone buys",
        {"distill": {"teachers": [{"source": "teacher_msad"}], "msad": {}}},
    ),
    (
        "progressive",
        "weak then strong teacher, MGD per stage",
        {
            "distill": {
                "mgd": {},
                "stages": [
                    {"teacher": {"source": "teacher_weak"}, "settings": {"train": {"epochs": "HALF_EPOCHS"}}},
                    {"teacher": {"source": "teacher"}, "settings": {"train": {"epochs": "HALF_EPOCHS"}}},
                ],
            }
        },
    ),
    (
        "combo",
        "MSAD + SSIM on the multi-scale teacher, init from teacher",
        {"distill": {"teachers": [{"source": "teacher_msad"}], "msad": {}, "ssim": {}, "init_from_teacher": True}},
    ),
]


def build_spec(budget: dict, workdir: Path | str) -> dict:
    epochs = budget["epochs"]
    teacher = {"train": {"epochs": budget["teacher_epochs"]}, "model": {"min_level": 3, "max_level": 7}}
    students = []
    for name, _, settings in ROWS:
        text = json.dumps(settings).replace('"HALF_EPOCHS"', str(max(1, epochs // 2)))
        for seed in budget["seeds"]:
            merged = json.loads(json.dumps(HALF))
            for key, value in json.loads(text).items():
                merged[key] = {**merged.get(key, {}), **value}
            merged["seed"] = seed
            students.append({"name": f"{name}-s{seed}", "settings": merged})
    return {
        "name": "distill_bench",
        "workdir": str(workdir),
        "tracking": {"experiment": "detkd-distill-bench"},
        "data": {
            "synth": {
                "images": budget["images"],
                "size": 128,
                "seed": 11,
                "val_fraction": 0.2,
                "classes": ["square", "circle", "triangle", "cross", "ring", "diamond"],
                "min_object": 4,
                "max_object": 40,
                "max_objects": 6,
                "clutter": 0.5,
                "noise": 0.04,
            }
        },
        "defaults": {
            "model": {"arch": "fcos", "backbone": "tiny", "fpn_channels": 64, "head_convs": 2},
            "input": {"size": 128, "augment": {"hflip": 0.5}},
            "optim": {"name": "adamw", "lr": 0.002, "warmup_iters": 100, "schedule": "cosine"},
            "train": {"epochs": epochs, "batch_size": 16, "log_every": 100},
            "tracking": {"log_model": False},
        },
        "teachers": [
            {"name": "teacher", "settings": teacher},
            {"name": "teacher_msad", "settings": {**teacher, "model": {**teacher["model"], "multiscale": True}}},
            {
                "name": "teacher_weak",
                "settings": {
                    "train": {"epochs": max(1, budget["teacher_epochs"] // 4)},
                    "model": {"min_level": 3, "max_level": 7, "fpn_channels": 32, "head_convs": 1},
                },
            },
        ],
        "students": students,
    }


def summarise(rows: list[dict], seeds: list[int], row_specs: list[tuple[str, str, dict]] | None = None) -> list[dict]:
    """Mean and std over seeds of each row (``row_specs``, default ROWS), and its gain over ``baseline``."""
    by_name = {r["name"]: r for r in rows}
    table = []
    baseline = None
    for name, what, _ in ROWS if row_specs is None else row_specs:
        runs = [by_name[f"{name}-s{s}"] for s in seeds if f"{name}-s{s}" in by_name]
        entry = {"row": name, "what": what, "method": runs[0].get("method", "") if runs else "", "n": len(runs)}
        for metric in ("AP", "AP50", "APs"):
            values = [r[metric] for r in runs]
            entry[metric] = statistics.mean(values) if values else float("nan")
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        entry["input_size"] = runs[0]["input_size"] if runs else 0
        if name == "baseline":
            baseline = entry
        table.append(entry)
    for entry in table:
        for metric in ("AP", "AP50", "APs"):
            entry[f"{metric}_gain"] = entry[metric] - baseline[metric] if baseline else float("nan")
    return table


def markdown(table: list[dict], meta: dict) -> str:
    lines = [
        "# Distillation benchmark",
        "",
        f"Command: `{meta['command']}`  ",
        f"Budget: {meta['budget']} ({meta['budget_settings']}); wall time {meta['wall_s'] / 60:.0f} min.  ",
        f"Machine: {meta['machine']}; versions: {meta['versions']}.  ",
        "Data: synthetic small objects (4-40 px at 128 px, 6 shape classes, clutter 0.5); the teacher and",
        "the upper reference see 128 px, every other student 64 px. Scores on the held-out split (mean +- std",
        f"over seeds {meta['seeds']}); gain = difference to the half-resolution baseline.",
        "",
        *([meta["note"], ""] if meta.get("note") else []),
        "| row | method | input | AP | AP50 | APs | gain AP | gain APs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['row']} | {e['method']} | {e['input_size']} | {e['AP']:.4f} +- {e['AP_std']:.4f} | "
            f"{e['AP50']:.4f} +- {e['AP50_std']:.4f} | {e['APs']:.4f} +- {e['APs_std']:.4f} | "
            f"{e['AP_gain']:+.4f} | {e['APs_gain']:+.4f} |"
        )
    lines += ["", "Rows: " + "; ".join(f"**{e['row']}**: {e['what']}" for e in table), ""]
    return "\n".join(lines)


def plot(table: list[dict], path: Path, *, title: str = "Half-resolution students: distillation vs baseline") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [e["row"] for e in table]
    x = range(len(names))
    ax.bar(
        [i - 0.2 for i in x], [e["AP"] for e in table], 0.4, yerr=[e["AP_std"] for e in table], label="AP", capsize=3
    )
    ax.bar(
        [i + 0.2 for i in x], [e["APs"] for e in table], 0.4, yerr=[e["APs_std"] for e in table], label="APs", capsize=3
    )
    base = next(e for e in table if e["row"] == "baseline")
    ax.axhline(base["AP"], color="C0", linestyle="--", linewidth=1, label="baseline AP")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("COCO AP (held-out split)")
    ax.set_title(f"{title} (mean +- std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_results(stem: Path, experiment: str) -> None:
    """The results files (``stem``.md/.png/.json) as artifacts of the experiment's latest pipeline parent run."""
    from detkd.tracking.runs import RunLogger, find_runs, resolve_tracking_uri

    parent = find_runs(resolve_tracking_uri(), experiment, {"detkd.kind": "pipeline"})
    if parent:
        logger = RunLogger(tracking_uri=resolve_tracking_uri(), run_id=parent[0].info.run_id)
        for suffix in (".md", ".png", ".json"):
            logger.artifact(Path(f"{stem}{suffix}"), "benchmark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--workdir", type=Path, default=Path("runs/distill_bench"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", default="", help="comma-separated rows to (re)run, merged into the existing results")
    args = parser.parse_args()
    import torch

    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import run_pipeline

    budget = BUDGETS[args.budget]
    stem = args.out / f"distill_bench_{args.budget}"
    only = {name for name in args.only.split(",") if name}
    unknown = only - {name for name, _, _ in ROWS}
    if unknown:
        parser.error(f"--only: unknown rows {sorted(unknown)}")
    # the recorded spec names the workdir relative to the repository; the run gets the real one
    spec_data = build_spec(budget, repo_path(args.workdir))
    previous: dict = {}
    if only:
        previous = json.loads(Path(f"{stem}.json").read_text())
        spec_data["students"] = [s for s in spec_data["students"] if s["name"].rsplit("-s", 1)[0] in only]
    args.out.mkdir(parents=True, exist_ok=True)
    spec_path = Path(f"{stem}.only.spec.json" if only else f"{stem}.spec.json")
    spec_path.write_text(json.dumps(spec_data, indent=1))
    spec = load_pipeline(spec_path, [f"workdir={args.workdir}"])
    start = time.perf_counter()
    rows = [row.to_dict() for row in run_pipeline(spec)]
    wall = time.perf_counter() - start + previous.get("meta", {}).get("wall_s", 0.0)
    if only:  # keep the earlier rows of the rows not rerun; the teachers were retrained with these
        fresh = {r["name"] for r in rows}
        rows = [r for r in previous["rows"] if r["name"] not in fresh and r["role"] == "student"] + rows
    table = summarise(rows, budget["seeds"])
    import ray

    meta = {
        "command": "; then ".join(filter(None, [previous.get("meta", {}).get("command"), repo_command()])),
        "budget": args.budget,
        "budget_settings": budget,
        "wall_s": wall,
        "seeds": budget["seeds"],
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}",
    }
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "table": table, "rows": rows}, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown(table, meta))
    plot(table, Path(f"{stem}.png"))
    log_results(stem, spec.tracking.experiment)
    print(markdown(table, meta))


if __name__ == "__main__":
    import logging
    import sys

    logging.basicConfig(format="%(message)s", stream=sys.stdout)  # the library's progress lines, as print gave
    logging.getLogger("detkd").setLevel(logging.INFO)
    main()
