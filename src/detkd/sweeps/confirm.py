"""Measure the finished trials' deployed speed again when the sweep is over, one after another, quietly.

A trial measures its speed right after its last epoch, while other trials train beside it. On
the 2-CPU benchmark machine that made the figures unreliable exactly where they decide (one
design measured feasible in one trial and not in another: benchmarks/README.md, "Students sized
to a latency budget"), and choosing the most accurate of several noisy "feasible" trials favours
an overestimate.

So when every trial has ended, the driver measures each trial that trained to the end again
against the same reference, with the same settings, nothing else running: that figure decides
feasibility, the front and the choice (``speed/*``), the trial's own is kept as
``speed/speedup_in_trial``, and the trial's MLflow run gets both. A model the driver cannot
read (a trial that ran on another node's disk) keeps its trial's figure, and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from detkd.records import TrialRow
from detkd.sweeps.objectives import unmet
from detkd.sweeps.trial import SweepJob

log = logging.getLogger(__name__)

IN_TRIAL = "speed/speedup_in_trial"


def confirm_speeds(rows: list[TrialRow], configs: dict[str, Any], *, job: SweepJob) -> list[str]:
    """Re-measure every row with a measured speed and a readable model; feasibility re-judged. Returns the ids."""
    from detkd.serving.speed import SpeedUnavailable, speed_description
    from detkd.tracking.runs import RunLogger

    confirmed = []
    for row in rows:
        if "speed/speedup" not in row.measures or not row.model_path or row.trial_id not in configs:
            continue
        if not Path(row.model_path).is_file():
            log.info(f"trial {row.trial_id}: {row.model_path} is not on this machine; its trial's speed stands")
            continue
        try:
            report = job.measure_speed(configs[row.trial_id], Path(row.model_path))
        except SpeedUnavailable as exc:
            log.info(f"trial {row.trial_id}: speed not measured again ({exc}); its trial's figure stands")
            continue
        if report is None:  # no reference
            continue
        in_trial = row.measures["speed/speedup"]
        row.measures.update({f"speed/{k}": v for k, v in report.metrics().items()})
        row.measures[IN_TRIAL] = in_trial
        reasons = unmet({job.metric_key: row.metric, **row.measures}, job.constraints)
        row.feasible, row.unmet = not reasons, "; ".join(reasons)
        if row.mlflow_run_id:
            logger = RunLogger(tracking_uri=job.tracking.uri, run_id=row.mlflow_run_id)
            # at the trial's own step (its last epoch): the later value is the run's latest
            confirmed_metrics = {f"speed/{k}": v for k, v in report.metrics().items()} | {IN_TRIAL: in_trial}
            logger.metrics(confirmed_metrics, step=row.planned_epochs)
            logger.tags({"speed.confirmed": "after the sweep, alone on the driver's machine"})
        log.info(
            f"trial {row.trial_id}: deployed {speed_description(report.metrics())} measured again alone "
            f"(in the trial: {in_trial:.2f}x)"
        )
        confirmed.append(row.trial_id)
    return confirmed
