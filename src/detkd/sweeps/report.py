"""A sweep's results: the live and final tables, trials.parquet, best_config.yaml, plots, MLflow.

Every number says its split: trials are ranked on ``val/*``; only the chosen trial's
model is scored on the held-out test split (``test/*``), which no trial read.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ray import tune

from detkd.config import Config
from detkd.records import TrialRow
from detkd.sweeps import pareto
from detkd.sweeps.objectives import INFEASIBLE, pareto_front, unmet
from detkd.sweeps.space import design_label, student_epochs, value_label
from detkd.sweeps.trial import TRIAL_EPOCH, SweepJob

PLOTS = ("metric_vs_parameters.png", "learning_curves.png")
# columns of trials.parquet the final table in the log leaves out (pareto.md has the speed and cost details)
TABLE_LEAVES_OUT = (
    "model_path", "mlflow_run_id", "unmet", "speed/reference_latency_ms", "speed/speedup_spread",
    "speed/speedup_in_trial",
    "speed/images_per_s", "cost/params",
)  # fmt: skip
log = logging.getLogger(__name__)


class LiveTable(tune.Callback):
    """Logs the trials (state, epoch, metric, parameters) while the sweep runs: on every
    trial's start and end, and at most every ``every_s`` seconds in between."""

    def __init__(self, *, metric_key: str, parameters: list[str], every_s: float = 30.0) -> None:
        self.metric_key = metric_key
        self.parameters = parameters
        self.every_s = every_s
        self.last_print = 0.0

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if time.monotonic() - self.last_print >= self.every_s:
            self.show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.show(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.show(trials)

    def show(self, trials) -> None:
        self.last_print = time.monotonic()
        rows = [
            {
                "trial": t.trial_id,
                "state": t.status,
                "epoch": (t.last_result or {}).get(TRIAL_EPOCH, 0),
                self.metric_key: (t.last_result or {}).get(self.metric_key),
                **{p: t.config.get(p) for p in self.parameters},
            }
            for t in trials
        ]
        log_table(rows, title=f"trials ({self.metric_key} on the validation split)")


def log_table(rows: list[dict[str, Any]], *, title: str) -> None:
    """One log record: the table as text (as wide as the terminal, 160 columns when piped), and the table
    itself as ``extra["renderable"]`` for a console handler (the CLI's) to draw in colour."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(str(column), overflow="fold")
    for row in rows:
        table.add_row(*[_cell(v) for v in row.values()])
    text = io.StringIO()
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 160
    Console(file=text, width=width).print(table)
    log.info(text.getvalue().rstrip("\n"), extra={"renderable": table})


def _cell(value: Any) -> str:
    from rich.markup import escape

    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else escape(str(value))  # "[a, b]" would otherwise read as rich markup


# --------------------------------------------------------------------------- tables


def trial_rows(results, *, job: SweepJob) -> tuple[list[TrialRow], pd.DataFrame, dict[str, Config]]:
    """(one row per trial, one row per trial epoch, each trial's run config) from Tune's experiment state."""
    from ray.tune import ExperimentAnalysis

    from detkd.tracking.runs import find_runs

    analysis = ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem)
    frames = analysis.trial_dataframes
    rows, epoch_frames, configs = [], [], {}
    for trial in analysis.trials:
        values = job.decode(trial.config)
        cfg = configs[trial.trial_id] = job.trial_config(values, trial.trial_id)
        planned = student_epochs(cfg)
        every = frames.get(trial.trial_id, pd.DataFrame())
        measures = last_measures(every)
        ruled_out = ruled_out_before_training(every)
        # one report per epoch: the last epoch's comes with the speed and INFEASIBLE in the trial function's
        # last report (sweeps before that also sent it from the Train run: the epoch report is kept)
        if job.metric_key in every and TRIAL_EPOCH in every:
            reports = every[every[job.metric_key].notna()]
            if INFEASIBLE in reports:
                reports = reports.sort_values(INFEASIBLE, na_position="first", kind="stable")
            reports = reports.drop_duplicates(TRIAL_EPOCH, keep="first").sort_values(TRIAL_EPOCH)
        else:
            reports = pd.DataFrame(columns=[TRIAL_EPOCH, job.metric_key])
        done = int(reports[TRIAL_EPOCH].max()) if len(reports) else 0
        runs = find_runs(
            job.tracking.uri,
            job.tracking.experiment,
            {"detkd.sweep_run": str(job.tracking.parent_run_id), "detkd.trial_id": trial.trial_id},
        )
        model = Path(cfg.run.output_dir) / cfg.name / "model.pt"
        row = TrialRow(
            trial_id=trial.trial_id,
            state=trial.status,
            stopped_early=trial.status == "TERMINATED" and done < planned and not ruled_out,
            epochs=done,
            planned_epochs=planned,
            metric_key=job.metric_key,
            metric=float(reports[job.metric_key].iloc[-1]) if len(reports) else float("nan"),
            best_metric=float(reports[job.metric_key].max()) if len(reports) else float("nan"),
            params={k: value_label(v) for k, v in values.items()},
            attempts=int(runs[0].data.metrics.get("attempt", 0)) if runs else 0,
            mlflow_run_id=runs[0].info.run_id if runs else None,
            model_path=str(model) if model.is_file() and trial.status == "TERMINATED" and not ruled_out else None,
            measures=measures,
            design=design_label(cfg),
            ruled_out=ruled_out,
        )
        reasons = unmet({job.metric_key: row.metric, **measures}, job.constraints)
        row.feasible, row.unmet = not reasons, "; ".join(reasons)
        rows.append(row)
        if len(reports):
            keep = [c for c in reports.columns if c in (TRIAL_EPOCH, "stage") or c.startswith(("val/", "train/"))]
            epoch_frames.append(reports[keep].assign(trial_id=trial.trial_id))
    epochs = pd.concat(epoch_frames, ignore_index=True) if epoch_frames else pd.DataFrame()
    mark_front(rows, job=job)
    return rows, epochs, configs


def last_measures(reports: pd.DataFrame) -> dict[str, float]:
    """A trial's ``cost/*`` and ``speed/*`` values: the last one reported of each."""
    out = {}
    for column in reports.columns:
        if str(column).startswith(("cost/", "speed/")):
            values = reports[column].dropna()
            if len(values):
                out[str(column)] = float(values.iloc[-1])
    return out


def ruled_out_before_training(reports: pd.DataFrame) -> bool:
    """Whether the trial's reports include the one a cost bound ends it with: infeasible at trial epoch 0."""
    if INFEASIBLE not in reports or TRIAL_EPOCH not in reports:
        return False
    return bool(((reports[INFEASIBLE] == 1) & (reports[TRIAL_EPOCH] == 0)).any())


def objective_value(row: TrialRow, key: str) -> float:
    return row.metric if key == row.metric_key else row.measures.get(key, float("nan"))


def mark_front(rows: list[TrialRow], *, job: SweepJob) -> None:
    """``pareto`` on the trials no other trial beats in every objective (among those with every objective
    measured: the trials that trained to the end); only a sweep of several objectives has a front."""
    for row in rows:
        row.pareto = False
    if len(job.objectives) < 2:
        return
    measured = [
        r for r in rows
        if not r.stopped_early and r.model_path and all(
            not math.isnan(objective_value(r, o.key)) for o in job.objectives
        )
    ]  # fmt: skip
    points = [[objective_value(r, o.key) for o in job.objectives] for r in measured]
    for index in pareto_front(points, [o.mode for o in job.objectives]):
        measured[index].pareto = True


def write_tables(workdir: Path, rows: list[TrialRow], epochs: pd.DataFrame) -> None:
    """``trials.parquet`` (one row per trial) and ``epochs.parquet`` (every reported epoch)."""
    trials = pd.DataFrame([row.to_dict() for row in rows])
    for name, frame in (("trials.parquet", trials), ("epochs.parquet", epochs)):
        tmp = workdir / f".{name}.tmp"
        frame.astype({c: "string" for c in frame.columns if c.startswith("param.")}).to_parquet(tmp, index=False)
        tmp.replace(workdir / name)


def read_trials(path: Path, *, metric_key: str) -> list[TrialRow]:
    """``trials.parquet`` back as rows."""
    frame = pd.read_parquet(path)
    return [TrialRow.from_dict(data, metric_key=metric_key) for data in frame.to_dict("records")]


def close_trial_runs(rows: list[TrialRow], *, tracking_uri: str) -> None:
    """Trials ASHA stopped (or that failed) leave their MLflow runs RUNNING: end them, say why."""
    from detkd.tracking.runs import RunLogger, close_run

    for row in rows:
        if not row.mlflow_run_id or not row.finished:
            continue
        logger = RunLogger(tracking_uri=tracking_uri, run_id=row.mlflow_run_id)
        logger.tags({"stopped_early": str(row.stopped_early).lower(), "trial_state": row.state})
        status = "FAILED" if row.state == "ERROR" else "KILLED" if row.stopped_early else "FINISHED"
        close_run(tracking_uri, row.mlflow_run_id, status)


# --------------------------------------------------------------------------- the chosen trial


def choose_best(rows: list[TrialRow]) -> TrialRow | None:
    """The trial with the best last validation score among those that trained their whole budget and meet
    every constraint of the space."""
    scored = [r for r in rows if r.model_path and not math.isnan(r.metric)]
    complete = [r for r in scored if not r.stopped_early]
    pool = [r for r in complete or scored if r.feasible]
    return max(pool, key=lambda r: r.metric) if pool else None


def shippable_config(job: SweepJob, best: TrialRow) -> Config:
    """The best trial's config as a standalone run config that ``detkd distill`` runs as is:
    teacher names become their checkpoint paths, and the target's data (test split
    included), storage, tracking and checkpoint settings come back."""
    values = {p.name: p.decode(best.params[p.name]) for p in job.parameters if p.name in best.params}
    trial = job.trial_config(values, best.trial_id).model_dump(mode="json")
    base = job.base.model_dump(mode="json")
    trial["name"] = f"{job.base.name}-tuned"
    for section in ("run", "tracking", "scaling", "eval", "debug"):
        trial[section] = base[section]
    trial["data"] = base["data"]
    for key in ("eval_every", "checkpoint_every", "checkpoint_every_steps", "log_every"):
        trial["train"][key] = base["train"][key]
    distill = trial.get("distill") or {}
    for ref in distill.get("teachers", []) + [s["teacher"] for s in distill.get("stages", [])]:
        if ref["source"] in job.teacher_checkpoints:
            ref["source"] = str(Path(job.teacher_checkpoints[ref["source"]]).resolve())
    return Config.model_validate(trial)


def finish(outcome, *, job: SweepJob, epochs: pd.DataFrame, sweep_log) -> None:
    """Choose the best trial, score it on the test split, write best_config.yaml, plots, summary; log them."""
    from detkd.models.checkpoint import atomic_write_bytes

    workdir, rows, metric = outcome.workdir, outcome.rows, job.metric_key
    best = choose_best(rows)
    plots = write_plots(workdir / "plots", rows, epochs, job=job, best=best)
    front = pareto.write_front(workdir, rows, job=job, best=best)
    log_table(
        [{k.removeprefix("param."): v for k, v in r.to_dict().items() if k not in TABLE_LEAVES_OUT} for r in rows],
        title=f"sweep {job.name}: {len(rows)} trials ({metric} on the validation split)",
    )  # fmt: skip
    summary = sweep_summary(job, rows)
    if best is not None:
        scores = publish_best(outcome, job=job, best=best, sweep_log=sweep_log)
        summary["best"] = {
            "trial_id": best.trial_id,
            "params": dict(best.params),
            "scores": scores,
            "model_path": best.model_path,
            "mlflow_run_id": best.mlflow_run_id,
            "design": best.design,
            "measures": best.measures,
        }
    atomic_write_bytes(workdir / "summary.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    sweep_log.metrics(
        {"trials": len(rows), "stopped_early": summary["stopped_early"], "trial_epochs": summary["trial_epochs"]}
    )
    for name in ("trials.parquet", "epochs.parquet", "summary.json", "best_config.yaml", pareto.PARETO_TABLE):
        if (workdir / name).is_file():
            sweep_log.artifact(workdir / name)
    for path in plots + [p for p in front if p.suffix == ".png"]:
        sweep_log.artifact(path, "plots")


def sweep_summary(job: SweepJob, rows: list[TrialRow]) -> dict[str, Any]:
    """The sweep's ``summary.json`` before its best trial is known."""
    return {
        "sweep": job.name,
        "trials": len(rows),
        "stopped_early": sum(bool(r.stopped_early) for r in rows),
        "failed": sum(r.state == "ERROR" for r in rows),
        "trial_epochs": int(sum(r.epochs for r in rows)),
        "metric": job.metric_key,
        "objectives": {o.name: o.mode for o in job.objectives},
        "constraints": [str(c) for c in job.constraints],
        "ruled_out": sum(r.ruled_out for r in rows),
        "feasible": sum(r.feasible for r in rows),
        "front": [r.trial_id for r in rows if r.pareto],
        "best": None,
    }


def publish_best(outcome, *, job: SweepJob, best: TrialRow, sweep_log) -> dict[str, float]:
    """Score the chosen trial on the test split (when there is one), write best_config.yaml, tag its runs;
    its scores (the validation metric, then ``test/*``)."""
    from detkd.models.checkpoint import atomic_write_bytes
    from detkd.tracking.runs import RunLogger

    workdir, metric = outcome.workdir, job.metric_key
    header = (
        f"# Best configuration of sweep {job.name}: trial {best.trial_id}, "
        f"{metric} {best.metric:.4f} (validation split, used to choose it).\n"
    )
    scores: dict[str, float] = {metric: best.metric}
    test = held_out_scores(job, Path(best.model_path))
    if test is not None:
        scores |= {f"test/{k}": v for k, v in test.items()}
        header += f"# Held-out test split (no trial saw it): test/AP {test['AP']:.4f}.\n"
    else:
        header += "# The target has no test split: the validation score above is optimistic.\n"
    if job.constraints:
        header += f"# The most accurate trial that meets {', '.join(str(c) for c in job.constraints)}.\n"
    if "speed/speedup" in best.measures:
        header += (
            f"# Deployed: {best.measures['speed/speedup']:.2f}x its reference "
            f"({best.measures['speed/latency_ms']:.2f} ms/image, ONNX Runtime batch 1, on the trial's node).\n"
        )
    header += f"# Run it: detkd distill {workdir / 'best_config.yaml'}\n"
    cfg = shippable_config(job, best)
    text = header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    atomic_write_bytes(workdir / "best_config.yaml", text.encode())
    outcome.best = {**best.to_dict(), **scores}
    outcome.best_config, outcome.best_model = workdir / "best_config.yaml", Path(best.model_path)
    if best.mlflow_run_id:
        trial_log = RunLogger(tracking_uri=job.tracking.uri, run_id=best.mlflow_run_id)
        trial_log.tags({"best": "true"})
        trial_log.metrics({k: v for k, v in scores.items() if k.startswith("test/")})
    sweep_log.tags({"best_trial": best.trial_id, "best_run": best.mlflow_run_id or ""})
    sweep_log.metrics({f"best/{k}": v for k, v in {**scores, **best.measures}.items()})
    test_line = f", test/AP {scores['test/AP']:.4f} (held out)" if "test/AP" in scores else ""
    speed = best.measures.get("speed/speedup")
    speed_line = f", {speed:.2f}x its reference deployed" if speed is not None else ""
    log.info(f"best: trial {best.trial_id} {metric} {best.metric:.4f} (validation){test_line}{speed_line}")
    log.info(f"best configuration: {workdir / 'best_config.yaml'}")
    return scores


def held_out_scores(job: SweepJob, model: Path) -> dict[str, float] | None:
    """The chosen model's metrics on the target's held-out test split; None without one."""
    from detkd.engine.evaluate import evaluate_checkpoint
    from detkd.engine.plan import open_split

    if job.base.data.test is None:
        return None
    return evaluate_checkpoint(
        model,
        open_split(job.base.data.test, skip_invalid=False),
        batch_size=job.base.eval.batch_size,
        score_thresh=job.base.eval.score_thresh,
    ).metrics


# --------------------------------------------------------------------------- plots


def write_plots(
    folder: Path, rows: list[TrialRow], epochs: pd.DataFrame, *, job: SweepJob, best: TrialRow | None
) -> list[Path]:
    """The final validation metric against each parameter, and every trial's learning curve."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    best_id = best.trial_id if best else None
    paths = [folder / PLOTS[0], folder / PLOTS[1]]
    plot_metric_vs_parameters(paths[0], rows, job=job, best_id=best_id)
    plot_learning_curves(paths[1], rows, epochs, job=job, best_id=best_id)
    return paths


def plot_metric_vs_parameters(path: Path, rows: list[TrialRow], *, job: SweepJob, best_id: str | None) -> None:
    import matplotlib.pyplot as plt

    metric = job.metric_key
    params = [p for p in job.parameters if any(p.name in r.params for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(4.5 * max(1, len(params)), 3.8), squeeze=False)
    for ax, p in zip(axes[0], params, strict=False):
        labels = [r.params[p.name] for r in rows]
        if p.categorical:
            order = [value_label(v) for v in p.values]
            xs = [order.index(x) for x in labels]
            ax.set_xticks(range(len(order)), [str(o) for o in order], rotation=20, ha="right", fontsize=7)
        else:
            xs = [float(x) for x in labels]
            if p.kind == "loguniform":
                ax.set_xscale("log")
        for x, r in zip(xs, rows, strict=True):
            style = dict(marker="*", s=160, color="C3") if r.trial_id == best_id else dict(marker="o", s=40, color="C0")
            if r.stopped_early:
                style = dict(marker="o", s=40, facecolors="none", edgecolors="C7")
            ax.scatter([x], [r.metric], **style)
        ax.set_xlabel(p.name)
        ax.set_ylabel(f"{metric} (last epoch)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{job.name}: {metric} per parameter (hollow: stopped early by ASHA, star: chosen)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(
    path: Path, rows: list[TrialRow], epochs: pd.DataFrame, *, job: SweepJob, best_id: str | None
) -> None:
    import matplotlib.pyplot as plt

    metric = job.metric_key
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        curve = epochs[epochs["trial_id"] == r.trial_id] if len(epochs) else epochs
        if not len(curve):
            continue
        chosen = r.trial_id == best_id
        ax.plot(
            curve[TRIAL_EPOCH],
            curve[metric],
            linestyle="--" if r.stopped_early else "-",
            linewidth=2.5 if chosen else 1.2,
            color="C3" if chosen else None,
            label=f"{r.trial_id}{' (chosen)' if chosen else ''}",
        )
        if r.stopped_early:
            ax.scatter(curve[TRIAL_EPOCH].iloc[-1:], curve[metric].iloc[-1:], marker="x", color="k", zorder=3)
    ax.set_xlabel("trial epoch")
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title(f"{job.name}: learning curves (dashed, x: stopped early)")
    ax.grid(alpha=0.3)
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
