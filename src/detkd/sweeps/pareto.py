"""The accuracy/speed trade-off a sweep found: ``pareto.md`` and ``plots/pareto.png``.

Every trial is a point of accuracy (y) against the space's other objective (x; deployed ``speedup``
when the space has no second objective but measured speed): the Pareto front joined, trials that
break a constraint grey, the chosen trial starred, each point labelled with its design. Trials with no
value on x (stopped early by ASHA, ruled out before training, failed) sit in a strip on the right at
the accuracy they had reached.
"""

from __future__ import annotations

import math
from pathlib import Path

from detkd.models.checkpoint import atomic_write_bytes
from detkd.records import TrialRow
from detkd.sweeps.objectives import metric_key
from detkd.sweeps.trial import SweepJob

PARETO_PLOT = "pareto.png"
PARETO_TABLE = "pareto.md"


def x_axis(job: SweepJob, rows: list[TrialRow]) -> str | None:
    """The report key drawn on x: the first objective that is not accuracy, else the measured speedup."""
    others = [o.key for o in job.objectives if o.key != job.metric_key]
    if others:
        return others[0]
    key = metric_key("speedup")
    return key if any(key in r.measures for r in rows) else None


def write_front(workdir: Path, rows: list[TrialRow], *, job: SweepJob, best: TrialRow | None) -> list[Path]:
    """``pareto.md`` and ``plots/pareto.png`` when the sweep has a trade-off to show (else nothing)."""
    x = x_axis(job, rows)
    if x is None:
        return []
    table = workdir / PARETO_TABLE
    atomic_write_bytes(table, front_table(rows, job=job, best=best).encode())
    plot = workdir / "plots" / PARETO_PLOT
    plot.parent.mkdir(parents=True, exist_ok=True)
    draw_front(plot, rows, job=job, best=best, x=x)
    return [table, plot]


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def front_table(rows: list[TrialRow], *, job: SweepJob, best: TrialRow | None) -> str:
    """Every trial, the front first then by accuracy: its design, objectives, cost and why it is infeasible."""
    objectives = ", ".join(f"{o.name} ({o.mode})" for o in job.objectives)
    constraints = ", ".join(str(c) for c in job.constraints) or "none"
    lines = [
        f"# Sweep {job.name}: the trade-off",
        "",
        f"Objectives: {objectives}. Constraints: {constraints}. Accuracy on the validation split; speed is the "
        "deployed student (ONNX Runtime, batch 1) against its reference, measured in turns on the trial's node.",
        "",
        f"| trial | design | {job.metric_key} | speedup | latency ms | MFLOP | params | on front | feasible | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(rows, key=lambda r: (not r.pareto, -(r.metric if not math.isnan(r.metric) else -1)))
    for r in ordered:
        note = "chosen" if best is not None and r.trial_id == best.trial_id else ""
        if r.ruled_out:
            note = "ruled out before training"
        elif r.stopped_early:
            note = f"stopped early by ASHA at epoch {r.epochs}"
        elif r.state == "ERROR":
            note = "failed"
        m = r.measures
        lines.append(
            f"| {r.trial_id} | {r.design} | {_number(r.metric)} | {_number(m.get('speed/speedup'), 3)} | "
            f"{_number(m.get('speed/latency_ms'), 3)} | {_number(m.get('cost/mflops'), 4)} | "
            f"{int(m['cost/params']) if 'cost/params' in m else ''} | {'yes' if r.pareto else ''} | "
            f"{'yes' if r.feasible else 'no: ' + r.unmet} | {note} |"
        )
    return "\n".join(lines) + "\n"


def draw_front(path: Path, rows: list[TrialRow], *, job: SweepJob, best: TrialRow | None, x: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placed = [r for r in rows if not math.isnan(r.measures.get(x, math.nan)) and not math.isnan(r.metric)]
    unplaced = [r for r in rows if r not in placed]
    fig, (ax, side) = plt.subplots(
        1, 2, figsize=(10, 5.5), gridspec_kw={"width_ratios": [5, 1]}, sharey=True, squeeze=True
    )
    front = sorted((r for r in placed if r.pareto), key=lambda r: r.measures[x])
    if front:
        ax.plot([r.measures[x] for r in front], [r.metric for r in front], "-", color="C0", alpha=0.6, zorder=1)
    for r in placed:
        chosen = best is not None and r.trial_id == best.trial_id
        colour = "C3" if chosen else ("C0" if r.feasible else "0.65")
        ax.scatter(
            [r.measures[x]], [r.metric], marker="*" if chosen else "o", s=220 if chosen else 45, color=colour, zorder=3
        )
        ax.annotate(r.design, (r.measures[x], r.metric), fontsize=6, xytext=(4, 3), textcoords="offset points")
    for c in job.constraints:
        if c.key == x:
            ax.axvline(c.bound, linestyle="--", color="C2", linewidth=1)
            ax.annotate(str(c), (c.bound, ax.get_ylim()[0]), fontsize=7, color="C2", rotation=90, va="bottom")
        elif c.key == job.metric_key:
            ax.axhline(c.bound, linestyle="--", color="C2", linewidth=1)
    ax.set_xlabel(x + (" (x the reference, deployed)" if x == "speed/speedup" else ""))
    ax.set_ylabel(f"{job.metric_key} (validation)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{job.name}: front joined, grey = breaks a constraint, star = chosen", fontsize=9)
    for k, r in enumerate(unplaced):
        y = r.metric if not math.isnan(r.metric) else None
        label = "ruled out" if r.ruled_out else "stopped" if r.stopped_early else r.state.lower()
        if y is None:
            side.annotate(f"{r.trial_id}: {label}", (0.05, 0.02 + 0.05 * k), xycoords="axes fraction", fontsize=6)
            continue
        side.scatter([0.5], [y], marker="x", color="0.5")
        side.annotate(f"{r.design} ({label})", (0.5, y), fontsize=5, xytext=(3, 2), textcoords="offset points")
    side.set_xticks([])
    side.set_title("no speed", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
