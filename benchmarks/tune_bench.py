"""What sweeps buy: tuned loss weights vs defaults, ASHA vs no early stopping, teacher sequences.

Every part runs real sweeps (``detkd.sweeps``) on the quickstart data with a held-out
test split (150 images no trial reads) and writes ``benchmarks/results/tune_bench_<part>.{json,md}``:

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
import sys
import time
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
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
            "input": {"size": 128, "hflip": 0.5},
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
    from detkd.pipeline import load_pipeline, run_pipeline
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
    rows = run_pipeline(load_pipeline(eval_path))
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
    from detkd.pipeline import data_splits, load_pipeline

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["weights", "asha", "sequence"], required=True)
    parser.add_argument("--workdir", type=Path, default=Path("runs/tune_bench"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import ray
    import torch

    from detkd.engine.launch import ensure_ray

    ensure_ray()
    started = time.perf_counter()
    result = {"weights": part_weights, "asha": part_asha, "sequence": part_sequence}[args.part](args.workdir.resolve())
    result["meta"] = {
        "command": " ".join(["python", *sys.argv]),
        "wall_s": time.perf_counter() - started,
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune_bench_{args.part}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1, default=str))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
