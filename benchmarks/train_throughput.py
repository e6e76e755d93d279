"""Training throughput: the Ray Train loop vs a plain PyTorch loop, 2 workers vs 1, and the cost of a resume.

Same model (tiny FCOS, P3-P7), same data (synthetic 128 px), same per-step batch.
Results (JSON + Markdown, with the command and machine) go to benchmarks/results/.

    python benchmarks/train_throughput.py            # ~6 minutes on 2 CPU cores
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

import torch
from mlflow.tracking import MlflowClient
from repo_paths import repo_command  # this folder is on sys.path when run

from detkd.config import Config
from detkd.data.synth import SynthSpec, synthesize
from detkd.engine.launch import ensure_ray, run_training
from detkd.engine.loop import ProgressLog, setup, train_one_epoch
from detkd.engine.plan import build_plan
from detkd.engine.rng import seed_everything
from detkd.records import TrackingContext

RESULTS = Path(__file__).resolve().parent / "results"


def base_config(data: Path, work: Path, *, steps: int, batch: int) -> dict:
    return {
        "name": "bench",
        "seed": 0,
        "data": {
            "train": {"coco": str(data / "annotations/instances_train.json"), "images": str(data / "images/train")}
        },
        "model": {"arch": "fcos", "backbone": "tiny", "fpn_channels": 64, "head_convs": 2},
        "input": {"size": 128},
        "optim": {"lr": 0.002, "warmup_iters": 10},
        "train": {"epochs": 100, "max_steps": steps, "batch_size": batch, "log_every": 10},
        "run": {"storage_path": str(work / "ray"), "output_dir": str(work / "models")},
        "tracking": {"log_model": False},
    }


def plain_loop(cfg: Config, *, uri: str) -> float:
    """Steady-state images/s of the same setup / train_one_epoch / ProgressLog in one plain process."""
    torch.set_num_threads(os.cpu_count() or 1)
    plan = build_plan(cfg, tracking=TrackingContext(uri=uri, experiment="bench"))
    seed_everything(cfg.seed)
    run = setup(plan)
    rates: list[float] = []
    progress = ProgressLog(
        name="plain",
        every=cfg.train.log_every,
        total_steps=run.total_steps,
        steps_per_epoch=run.steps_per_epoch,
        epochs=cfg.train.epochs,
        world_size=1,
        rank=0,
        sink=lambda values, step: rates.append(values["train/images_per_s"]),
    )
    while run.state.step < run.total_steps:
        run.sampler.set_epoch(run.state.step // run.steps_per_epoch, start_batch=run.state.step % run.steps_per_epoch)
        train_one_epoch(run, clip_grad_norm=cfg.optim.clip_grad_norm, hooks=[progress])
    return sum(rates[1:]) / len(rates[1:])  # drop the first window (warm-up), as for the Ray loop


def ray_loop(cfg: Config, uri: str) -> dict:
    """Images/s reported by the Ray Train workers (steady state) and the whole call's wall time."""
    start = time.perf_counter()
    outcome = run_training(cfg, tracking=TrackingContext(uri=uri, experiment="bench"))
    wall = time.perf_counter() - start
    history = MlflowClient(uri).get_metric_history(outcome.run_id, "train/images_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]  # drop the first window (warm-up)
    steps = sorted(m.step for m in MlflowClient(uri).get_metric_history(outcome.run_id, "train/loss"))
    return {"images_per_s": sum(rates) / len(rates), "wall_s": wall, "logged_steps": steps, "run_id": outcome.run_id}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved plain / Ray runs (medians reported)")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_throughput")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="detkd-bench-"))
    data = work / "data"
    synthesize(data, SynthSpec(images=600, size=128, seed=0, min_object=8, max_object=48, val_fraction=0.1))
    uri = f"sqlite:///{work / 'mlflow.db'}"

    def config(**changes) -> Config:
        raw = base_config(data, work, steps=args.steps, batch=args.batch)
        for section, values in changes.items():
            if isinstance(values, dict):
                raw[section] = {**raw.get(section, {}), **values}
            else:
                raw[section] = values
        return Config.model_validate(raw)

    results: dict = {
        "command": repo_command(),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "model": "fcos tiny P3-P7, 128 px",
        "steps": args.steps,
        "batch_per_step": args.batch,
    }
    ensure_ray()
    plain, ray1 = [], []
    for i in range(args.repeats):  # interleaved: run-to-run noise on a shared 2-core machine is ~10 %
        print(f"[{i + 1}/{args.repeats}] plain PyTorch loop ...", flush=True)
        plain.append(plain_loop(config(name=f"plain{i}"), uri=uri))
        print(f"[{i + 1}/{args.repeats}] Ray Train, 1 worker x 2 CPUs ...", flush=True)
        ray1.append(ray_loop(config(name=f"ray1-{i}"), uri))
    results["plain_runs"] = [round(r, 1) for r in plain]
    results["ray_1_worker_runs"] = [round(r["images_per_s"], 1) for r in ray1]
    results["plain_images_per_s"] = statistics.median(plain)
    results["ray_1_worker"] = sorted(ray1, key=lambda r: r["images_per_s"])[len(ray1) // 2]
    print("Ray Train, 2 workers x 1 CPU (same global batch) ...", flush=True)
    results["ray_2_workers"] = ray_loop(
        config(name="ray2", train={"batch_size": args.batch // 2}, scaling={"num_workers": 2, "cpus_per_worker": 1}),
        uri,
    )
    print("resume: 1 worker killed once after step 65, checkpoint every 20 steps ...", flush=True)
    every_step = {"checkpoint_every_steps": 20, "log_every": 1}
    resumed = ray_loop(
        config(name="resume", train=every_step, run={"max_failures": 1}, debug={"fail_at_step": 65}), uri
    )
    clean = ray_loop(config(name="clean", train=every_step), uri)
    steps = resumed["logged_steps"]
    results["resume"] = {
        "wall_with_failure_s": resumed["wall_s"],
        "wall_without_s": clean["wall_s"],
        "seconds_lost": resumed["wall_s"] - clean["wall_s"],
        "steps_repeated": len(steps) - len(set(steps)),
    }
    results["ray_vs_plain"] = results["ray_1_worker"]["images_per_s"] / results["plain_images_per_s"]
    results["two_vs_one_worker"] = results["ray_2_workers"]["images_per_s"] / results["ray_1_worker"]["images_per_s"]
    for key in ("ray_1_worker", "ray_2_workers"):
        results[key].pop("logged_steps")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    m = r["machine"]
    return f"""# Training throughput

Command: `{r["command"]}`
Machine: {m["cpus"]} CPUs ({m["processor"]}), Python {m["python"]}, torch {m["torch"]}.
Model: {r["model"]}; {r["steps"]} steps of {r["batch_per_step"]} images per step (global batch).

Medians of {len(r["plain_runs"])} interleaved runs each: plain {r["plain_runs"]}, Ray 1 worker {r["ray_1_worker_runs"]}.

| loop | images/s | relative |
|---|---|---|
| plain PyTorch, 1 process | {r["plain_images_per_s"]:.1f} | 1.00 |
| Ray Train, 1 worker x 2 CPUs | {r["ray_1_worker"]["images_per_s"]:.1f} | {r["ray_vs_plain"]:.2f} |
| Ray Train, 2 workers x 1 CPU (DDP, gloo) | {r["ray_2_workers"]["images_per_s"]:.1f} | \
{r["ray_2_workers"]["images_per_s"] / r["plain_images_per_s"]:.2f} |

2 workers vs 1 on this machine: {r["two_vs_one_worker"]:.2f}x. Steady-state images/s (the first
logging window is dropped); Ray start-up and MLflow logging are in the wall times:
1 worker {r["ray_1_worker"]["wall_s"]:.0f} s, 2 workers {r["ray_2_workers"]["wall_s"]:.0f} s.

Resume after a killed worker (checkpoint every 20 steps, killed after step 65):
{r["resume"]["seconds_lost"]:.1f} s lost ({r["resume"]["wall_with_failure_s"]:.0f} s vs \
{r["resume"]["wall_without_s"]:.0f} s without the failure), {r["resume"]["steps_repeated"]} steps repeated \
(counted from the per-step loss log in MLflow).
"""


if __name__ == "__main__":
    main()
