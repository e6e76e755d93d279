"""What sweeps buy: tuned loss weights vs defaults, ASHA vs no early stopping, teacher sequences.

Every part runs real sweeps (``detkd.sweeps``) on the quickstart data with a held-out
test split (150 images no trial reads) and writes ``benchmarks/results/tune_bench_<part>.json`` plus a
summary of every part recorded so far, ``tune_bench.md`` and ``tune_bench.png`` (``--part report`` rewrites
only those):

    python benchmarks/tune_bench.py --part weights    # SSIM, MGD, DSAMKD: tuned on val vs defaults, 3 seeds, test AP
    python benchmarks/tune_bench.py --part asha       # the same search with ASHA and with FIFO: trial-epochs spent
    python benchmarks/tune_bench.py --part sequence   # orders/subsets of two teachers vs the best single one, 3 seeds

Sweeps and trained models stay in ``--workdir`` (default runs/tune_bench): a rerun continues them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import yaml
from repo_paths import repo_command  # this folder is on sys.path when run

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("sequence", "asha", "weights")
SEEDS = (0, 1, 2)
HALF = {"input": {"scale": 0.5}, "model": {"min_level": 2, "max_level": 6}}
METHODS: dict[str, tuple[dict, dict]] = {
    # method -> (student distill section with the default weights, the weight parameters searched)
    "ssim": ({"ssim": {}}, {"distill.ssim.weight": {"loguniform": [0.5, 12.0]}}),
    "mgd": ({"mgd": {}}, {"distill.mgd.weight": {"loguniform": [4.0e-6, 1.0e-4]}}),
    "dsamkd": (
        {"dsamkd": {}},
        {
            "distill.dsamkd.feature_weight": {"loguniform": [4.0e-7, 1.0e-5]},
            "distill.dsamkd.logit_weight": {"loguniform": [0.25, 4.0]},
        },
    ),
}


def base_spec(workdir: Path, students: list[dict], name: str) -> dict:
    """The quickstart data (plus a 150-image test split) and two teachers of useful strength."""
    return {
        "name": name,
        "workdir": str(workdir),
        "tracking": {"experiment": "detkd-tune-bench"},
        "data": {
            "synth": {
                "images": 900,
                "test_images": 150,
                "size": 128,
                "seed": 0,
                "val_fraction": 0.15,
                "classes": ["square", "circle", "triangle"],
                "min_object": 12,
                "max_object": 48,
                "max_objects": 4,
                "clutter": 0.2,
                "noise": 0.03,
            }
        },
        "defaults": {
            "model": {"arch": "fcos", "backbone": "tiny", "fpn_channels": 64, "head_convs": 2},
            "input": {"size": 128, "augment": {"hflip": 0.5}},
            "optim": {"name": "adamw", "lr": 0.002, "warmup_iters": 100, "schedule": "cosine"},
            "train": {"epochs": 8, "batch_size": 16, "log_every": 100},
            "tracking": {"log_model": False},
        },
        "teachers": [
            {
                "name": "teacher_narrow",
                "settings": {"model": {"fpn_channels": 32, "head_convs": 1}, "train": {"epochs": 6}},
            },
            {"name": "teacher", "settings": {"model": {"min_level": 3, "max_level": 7}}},
        ],
        "students": students,
    }


def student(name: str, distill: dict, *, seed: int = 0, teacher: str = "teacher") -> dict:
    return {
        "name": name,
        "settings": {**HALF, "seed": seed, "distill": {"teachers": [{"source": teacher}], **distill}},
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep(space: Path, **options: Any):
    from detkd.sweeps.space import load_space
    from detkd.sweeps.tuner import SweepOptions, run_sweep

    loaded = load_space(space)
    return run_sweep(loaded, options=SweepOptions.from_budget(loaded.space.budget, **options))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------- parts


def part_weights(workdir: Path) -> dict:
    """Per method: a 6-trial ASHA sweep of its weights on val, then defaults and tuned, 3 seeds each, on test."""
    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import run_pipeline
    from detkd.sweeps.space import set_dotted

    students = [student(f"student_{m}", distill) for m, (distill, _) in METHODS.items()]
    spec_path = write_yaml(workdir / "weights.pipeline.yaml", base_spec(workdir, students, "tune_bench_weights"))
    chosen: dict[str, dict] = {}
    for method, (_, parameters) in METHODS.items():
        space = write_yaml(
            workdir / f"weights_{method}.space.yaml",
            {
                "name": f"weights_{method}",
                "target": {"pipeline": str(spec_path), "student": f"student_{method}"},
                "parameters": parameters,
                "budget": {
                    "samples": 6,
                    "max_concurrent": 2,
                    "scheduler": "asha",
                    "grace_epochs": 2,
                    "reduction_factor": 3,
                    "search": "random",
                    "seed": 0,
                },
            },
        )
        outcome = sweep(space)
        chosen[method] = {k.removeprefix("param."): v for k, v in outcome.best.items() if k.startswith("param.")}
        chosen[method]["sweep_val_AP"] = outcome.best["val/AP"]
        chosen[method]["trial_epochs"] = sum(t["epochs"] for t in outcome.trials)
    students = []
    for method, (distill, _) in METHODS.items():
        for seed in SEEDS:
            students.append(student(f"{method}-default-s{seed}", distill, seed=seed))
            tuned = {"distill": json.loads(json.dumps(distill))}
            for key, value in chosen[method].items():
                if key.startswith("distill."):
                    set_dotted(tuned, key, float(value))
            students.append(student(f"{method}-tuned-s{seed}", tuned["distill"], seed=seed))
    students += [{"name": f"baseline-s{s}", "settings": {**HALF, "seed": s}} for s in SEEDS]
    eval_path = write_yaml(
        workdir / "weights_eval.pipeline.yaml", base_spec(workdir, students, "tune_bench_weights_eval")
    )
    rows = [row.to_dict() for row in run_pipeline(load_pipeline(eval_path))]
    table = []
    for method in ["baseline", *METHODS]:
        for variant in ["default", "tuned"] if method != "baseline" else [""]:
            prefix = f"{method}-{variant}-s" if variant else f"{method}-s"
            scores = [r["AP"] for r in rows if r["name"].startswith(prefix) and r["role"] == "student"]
            mean, std = mean_std(scores)
            table.append(
                {
                    "method": method,
                    "variant": variant or "kd_off",
                    "test_AP": mean,
                    "test_AP_std": std,
                    "n": len(scores),
                    "split": sorted({r["split"] for r in rows}),
                }
            )
    return {"chosen": chosen, "table": table, "rows": rows}


def part_asha(workdir: Path) -> dict:
    """One 8-trial random search (same seed, so the same configurations), with ASHA and with FIFO."""
    spec_path = write_yaml(
        workdir / "asha.pipeline.yaml", base_spec(workdir, [student("student_mgd", {"mgd": {}})], "tune_bench_asha")
    )
    results = {}
    for scheduler in ("asha", "fifo"):
        space = write_yaml(
            workdir / f"asha_{scheduler}.space.yaml",
            {
                "name": f"search_{scheduler}",
                "target": {"pipeline": str(spec_path), "student": "student_mgd"},
                "parameters": {
                    "distill.mgd.weight": {"loguniform": [4.0e-6, 1.0e-4]},
                    "optim.lr": {"loguniform": [5.0e-4, 6.0e-3]},
                },
                "budget": {
                    "samples": 8,
                    "max_concurrent": 2,
                    "scheduler": scheduler,
                    "grace_epochs": 2,
                    "reduction_factor": 3,
                    "search": "random",
                    "seed": 0,
                },
            },
        )
        started = time.perf_counter()
        outcome = sweep(space)
        trials = sorted(outcome.trials, key=lambda t: t["trial_id"])
        results[scheduler] = {
            "trial_epochs": sum(t["epochs"] for t in trials),
            "stopped_early": sum(bool(t["stopped_early"]) for t in trials),
            "best_val_AP": outcome.best["val/AP"],
            "best_test_AP": outcome.best.get("test/AP"),
            "best_params": {k.removeprefix("param."): v for k, v in outcome.best.items() if k.startswith("param.")},
            "wall_s": time.perf_counter() - started,
            "trials": [{k: t[k] for k in ("trial_id", "epochs", "val/AP", "stopped_early")} for t in trials],
        }
    return results


def part_sequence(workdir: Path) -> dict:
    """Two-stage orders and single teachers at an equal 8-epoch student budget, seeds 0-2, scored on test."""
    from detkd.engine.evaluate import evaluate_checkpoint
    from detkd.engine.plan import open_split
    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.spec import data_splits

    spec_path = write_yaml(
        workdir / "sequence.pipeline.yaml",
        base_spec(workdir, [student("student_seq", {"mgd": {}})], "tune_bench_sequence"),
    )
    space = write_yaml(
        workdir / "sequence.space.yaml",
        {
            "name": "sequence",
            "target": {"pipeline": str(spec_path), "student": "student_seq"},
            "parameters": {
                "teacher_sequence": {
                    "grid": [
                        ["teacher_narrow", "teacher"],
                        ["teacher", "teacher_narrow"],
                        ["teacher"],
                        ["teacher_narrow"],
                    ]
                },
                "seed": {"grid": list(SEEDS)},
            },
            "budget": {"samples": 1, "max_concurrent": 2, "scheduler": "fifo", "search": "grid"},
        },
    )
    outcome = sweep(space)
    test = open_split(data_splits(load_pipeline(spec_path)).test, skip_invalid=False)
    by_sequence: dict[str, dict[str, list[float]]] = {}
    for t in outcome.trials:
        scores = evaluate_checkpoint(Path(t["model_path"]), test, batch_size=16).metrics
        entry = by_sequence.setdefault(t["param.teacher_sequence"], {"val": [], "test": []})
        entry["val"].append(t["val/AP"])
        entry["test"].append(scores["AP"])
    table = []
    for sequence, scores in by_sequence.items():
        val, val_std = mean_std(scores["val"])
        tst, tst_std = mean_std(scores["test"])
        table.append(
            {
                "sequence": sequence,
                "val_AP": val,
                "val_AP_std": val_std,
                "test_AP": tst,
                "test_AP_std": tst_std,
                "n": len(scores["test"]),
            }
        )
    return {"table": table}


def write_report(out: Path) -> Path:
    """``tune_bench.md`` and ``tune_bench.png`` from every part's JSON recorded so far."""
    parts = {
        p: json.loads((out / f"tune_bench_{p}.json").read_text())
        for p in PARTS
        if (out / f"tune_bench_{p}.json").is_file()
    }
    lines = ["# What sweeps buy (`benchmarks/tune_bench.py`)", ""]
    lines += [
        "Quickstart data (765 train / 135 val / 150 held-out test images, 128 px), two teachers of useful strength",
        "(`teacher`: FCOS P3-P7; `teacher_narrow`: FPN 32 channels, 1 head conv, 6 epochs), 64 px students",
        "(P2-P6), 8 student epochs. Sweeps choose on val; every reported test number is on the held-out split.",
        "",
    ]
    if "sequence" in parts:
        table = sorted(parts["sequence"]["table"], key=lambda r: -r["test_AP"])
        lines += [
            "## Teacher sequences at equal student budget (c)",
            "",
            f"`{parts['sequence']['meta']['command']}` ({parts['sequence']['meta']['wall_s'] / 60:.0f} min; "
            f"{parts['sequence']['meta']['machine']}; {parts['sequence']['meta']['versions']})",
            "",
            "| teacher sequence | val AP (mean ± std) | test AP (mean ± std) | seeds |",
            "|---|---|---|---|",
        ]
        for r in table:
            lines.append(
                f"| {r['sequence']} | {r['val_AP']:.3f} ± {r['val_AP_std']:.3f} | "
                f"{r['test_AP']:.3f} ± {r['test_AP_std']:.3f} | {r['n']} |"
            )
        lines.append("")
    if "asha" in parts:
        a = parts["asha"]
        lines += [
            "## ASHA against the same search without early stopping (b)",
            "",
            f"`{a['meta']['command']}` ({a['meta']['wall_s'] / 60:.0f} min)",
            "",
            "| scheduler | trial-epochs | stopped early | best val AP | its test AP | wall |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("asha", "fifo"):
            r = a[name]
            test = f"{r['best_test_AP']:.3f}" if r.get("best_test_AP") is not None else "-"
            lines.append(
                f"| {name} | {r['trial_epochs']} | {r['stopped_early']} | {r['best_val_AP']:.3f} | {test} | "
                f"{r['wall_s'] / 60:.1f} min |"
            )
        lines.append("")
    if "weights" in parts:
        w = parts["weights"]
        lines += [
            "## Tuned loss weights against the defaults (a)",
            "",
            f"`{w['meta']['command']}` ({w['meta']['wall_s'] / 60:.0f} min)",
            "",
            "| method | weights | test AP (mean ± std, 3 seeds) |",
            "|---|---|---|",
        ]
        for r in w["table"]:
            lines.append(f"| {r['method']} | {r['variant']} | {r['test_AP']:.3f} ± {r['test_AP_std']:.3f} |")
        lines += ["", "Chosen on val:", ""]
        for method, chosen in w["chosen"].items():
            lines.append(f"- {method}: " + ", ".join(f"{k} = {v:.3g}" for k, v in chosen.items()))
        lines.append("")
    path = out / "tune_bench.md"
    path.write_text("\n".join(lines) + "\n")
    write_plot(parts, out / "tune_bench.png")
    return path


def write_plot(parts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("sequence", "asha", "weights") if p in parts]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, part in zip(axes[0], panels, strict=True):
        if part == "sequence":
            table = sorted(parts[part]["table"], key=lambda r: -r["test_AP"])
            ax.barh(
                [r["sequence"] for r in table], [r["test_AP"] for r in table], xerr=[r["test_AP_std"] for r in table]
            )
            ax.set_xlabel("test AP (3 seeds)")
            ax.set_title("teacher sequences, equal budget")
            ax.invert_yaxis()
        elif part == "asha":
            for name, marker in (("asha", "o"), ("fifo", "s")):
                trials = parts[part][name]["trials"]
                ax.scatter([t["epochs"] for t in trials], [t["val/AP"] for t in trials], marker=marker, label=name)
            ax.set_xlabel("epochs the trial ran")
            ax.set_ylabel("final val AP")
            ax.set_title("ASHA vs FIFO: epochs spent per trial")
            ax.legend()
        else:
            table = parts[part]["table"]
            labels = [f"{r['method']}\n{r['variant']}" for r in table]
            ax.bar(labels, [r["test_AP"] for r in table], yerr=[r["test_AP_std"] for r in table])
            ax.set_ylabel("test AP (3 seeds)")
            ax.set_title("tuned vs default loss weights")
            ax.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=[*PARTS, "report"], required=True, help="report: only rewrite the summary")
    parser.add_argument("--workdir", type=Path, default=Path("runs/tune_bench"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.part == "report":
        print(f"written: {write_report(args.out)}")
        return
    import ray
    import torch

    from detkd.engine.launch import ensure_ray

    ensure_ray()
    started = time.perf_counter()
    result = {"weights": part_weights, "asha": part_asha, "sequence": part_sequence}[args.part](args.workdir.resolve())
    result["meta"] = {
        "command": repo_command(),
        "wall_s": time.perf_counter() - started,
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune_bench_{args.part}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1, default=str))
    print(f"written: {path}, {write_report(args.out)}")


if __name__ == "__main__":
    import logging
    import sys

    logging.basicConfig(format="%(message)s", stream=sys.stdout)  # the library's progress lines, as print gave
    logging.getLogger("detkd").setLevel(logging.INFO)
    main()
