"""Wall time of a pipeline run one step at a time against ``--parallel N`` on this machine.

Runs the same spec (``pipelines/progressive.yaml`` by default: two teachers, a baseline and a
two-stage student) twice from scratch, each in a fresh workdir and MLflow store, and reads each
step's MLflow run back for a timeline: which steps overlapped and how long each took.

    python benchmarks/pipeline_parallel.py                 # ~30 min on 2 CPU cores
    python benchmarks/pipeline_parallel.py --parallel 2 --set defaults.train.epochs=2   # quicker

Writes ``benchmarks/results/pipeline_parallel.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from repo_paths import repo_command, repo_path  # this folder is on sys.path when run

RESULTS = Path(__file__).resolve().parent / "results"


def run_once(spec_path: Path, overrides: list[str], workdir: Path, *, parallel: int) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import run_pipeline

    shutil.rmtree(workdir, ignore_errors=True)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    workdir.mkdir(parents=True)
    spec = load_pipeline(spec_path, [*overrides, f"workdir={workdir}", f"tracking.tracking_uri={uri}"])
    started = time.perf_counter()
    rows = [row.to_dict() for row in run_pipeline(spec, parallel=parallel)]
    seconds = time.perf_counter() - started
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(spec.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("detkd.kind") == "pipeline")
    origin = parent.info.start_time
    steps = sorted(
        (
            {
                "step": r.info.run_name,
                "start_s": round((r.info.start_time - origin) / 1000, 1),
                "end_s": round((r.info.end_time - origin) / 1000, 1),
            }
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        ),
        key=lambda s: s["start_s"],
    )
    return {"parallel": parallel, "seconds": round(seconds, 1), "steps": steps, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("pipelines/progressive.yaml"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override of the spec")
    parser.add_argument("--workdir", type=Path, default=Path("runs/pipeline_parallel"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.spec.is_file():
        sys.exit(f"error: {args.spec}: no such pipeline spec")
    import ray

    results = []
    for parallel in (1, args.parallel):
        results.append(run_once(args.spec, args.overrides, args.workdir / f"parallel{parallel}", parallel=parallel))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "rows"}), flush=True)
        ray.shutdown()  # each run on a fresh local cluster
    import torch

    result = {
        "runs": results,
        "speedup": round(results[0]["seconds"] / results[1]["seconds"], 2),
        "meta": {
            "command": repo_command(),
            "spec": repo_path(args.spec),
            "overrides": args.overrides,
            "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, no GPU used",
            "versions": f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}",
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline_parallel.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, args.out / "pipeline_parallel.md")
    write_plot(result, args.out / "pipeline_parallel.png")
    print(f"written: {args.out / 'pipeline_parallel.json'}, pipeline_parallel.md, pipeline_parallel.png")


def write_markdown(result: dict, path: Path) -> None:
    meta = result["meta"]
    lines = [
        "# Pipeline wall time: one step at a time against side by side",
        "",
        f"`{meta['command']}` · {meta['spec']} {' '.join(meta['overrides'])} · {meta['machine']} · {meta['versions']}",
        "",
        "| --parallel | wall time (s) | speed-up |",
        "|---|---|---|",
    ]
    for run in result["runs"]:
        speedup = round(result["runs"][0]["seconds"] / run["seconds"], 2)
        lines.append(f"| {run['parallel']} | {run['seconds']} | {speedup}x |")
    for run in result["runs"]:
        lines += ["", f"Steps with --parallel {run['parallel']} (seconds from the pipeline run's start):", ""]
        lines += ["| step | start | end |", "|---|---|---|"]
        lines += [f"| {s['step']} | {s['start_s']} | {s['end_s']} |" for s in run["steps"]]
    lines += ["", "Test AP of each model (both runs train the same models; CPU threads per step differ):", ""]
    lines += ["| model | --parallel 1 | --parallel N |", "|---|---|---|"]
    for one, many in zip(result["runs"][0]["rows"], result["runs"][1]["rows"], strict=True):
        lines.append(f"| {one['name']} | {one['AP']:.3f} | {many['AP']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    figure, axes = plt.subplots(len(runs), 1, figsize=(9, 1.2 + 0.45 * len(runs[0]["steps"]) * len(runs)), sharex=True)
    for ax, run in zip(axes, runs, strict=True):
        for i, step in enumerate(run["steps"]):
            ax.barh(i, step["end_s"] - step["start_s"], left=step["start_s"], color="#90caf9", edgecolor="#37474f")
            ax.text(step["start_s"], i, f" {step['step']}", va="center", fontsize=7)
        ax.set_yticks([])
        ax.set_title(f"--parallel {run['parallel']}: {run['seconds']} s", fontsize=9)
    axes[-1].set_xlabel("seconds since the pipeline run started")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    import logging

    logging.basicConfig(format="%(message)s", stream=sys.stdout)  # the library's progress lines, as print gave
    logging.getLogger("detkd").setLevel(logging.INFO)
    main()
