"""One sweep trial: a Ray Tune function that drives a full Ray Train run (Train V2).

The trial's MLflow run is a child of the sweep's run; its training run (one per
progressive stage) is a child of the trial's. Every epoch's report travels from the
Train workers to Tune through :class:`TrialReport` (so ASHA can stop the trial between
epochs) and into the trial's MLflow run with the trial's own epoch count.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from detkd.config import Config
from detkd.records import RunPlan, TrackingContext
from detkd.serving.speed import SpeedSettings
from detkd.sweeps.objectives import INFEASIBLE, Constraint, Objective, unmet
from detkd.sweeps.space import Parameter, apply_trial, stage_epochs, student_epochs, trial_settings, value_label

TRIAL_EPOCH = "trial_epoch"  # epochs the trial has trained, over all its stages: ASHA's time axis
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepJob:
    """What every trial of a sweep shares (sent once to the trials with ``tune.with_parameters``)."""

    name: str
    base: Config
    parameters: tuple[Parameter, ...]
    workdir: Path
    tracking: TrackingContext  # parent_run_id: the sweep's MLflow run
    metric_key: str
    teacher_checkpoints: dict[str, Path] = field(default_factory=dict)  # pipeline teacher name -> model.pt
    teacher_runs: dict[str, str] = field(default_factory=dict)  # pipeline teacher name -> MLflow run id
    cpus_per_worker: float | None = None
    train_storage: str | None = None  # the trials' run.storage_path (sweeps.storage); None: <workdir>/train
    # the AWS keys and region of the sweep's driver, set in each trial's process before its Train run starts
    # there (see sweeps.storage.storage_keys); never printed
    storage_env: dict[str, str] = field(default_factory=dict, repr=False)
    objectives: tuple[Objective, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    speed: SpeedSettings = field(default_factory=SpeedSettings)

    @property
    def objective_keys(self) -> tuple[str, ...]:
        """The report keys of the objectives: every report to Tune carries each (``not_yet``)."""
        return tuple(o.key for o in self.objectives)

    def speed_reference(self, cfg: Config) -> tuple[str, Path] | None:
        """(name, checkpoint) a trial's deployed speed is compared with: the space's ``speed.reference``, else the
        trial's (first) teacher; None when there is neither."""
        from detkd.engine.teachers import resolve_source

        name = self.speed.reference or next(iter(sequence_of(cfg)), None)
        if name is None:
            return None
        cache, uri = self.workdir / "references", self.tracking.uri
        return name, resolve_source(name, names=self.teacher_checkpoints, cache_dir=cache, tracking_uri=uri)

    def measure_speed(self, cfg: Config, model: Path, *, run: Callable[..., Any] | None = None) -> Any:
        """The trained student's ``SpeedReport`` against the trial's reference with the space's settings, on
        the trial's validation images; ``run`` calls ``detkd.serving.speed.measure_speed`` (a Ray task, say).
        None without a reference; SpeedUnavailable when a model cannot be exported."""
        from detkd.serving.speed import measure_speed, split_images

        reference = self.speed_reference(cfg)
        if reference is None:
            return None
        name, checkpoint = reference
        images = split_images(cfg.data.val, count=self.speed.images)
        return (run or measure_speed)(model, checkpoint, images, settings=self.speed, reference_name=name)

    def decode(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Tune's sampled labels -> the YAML values of the space."""
        return {p.name: p.decode(sampled[p.name]) for p in self.parameters if p.name in sampled}

    def trial_config(self, values: dict[str, Any], trial_id: str) -> Config:
        """The run config of one trial: the space's values over the base, set up to report every epoch.

        The test split is removed: no trial reads it, only the chosen configuration is scored on it.
        """
        settings, sequence = trial_settings(self.base, self.parameters, values)
        cfg = apply_trial(self.base, settings, sequence, source=f"{self.name}: trial {trial_id}")
        data = cfg.model_dump(mode="json")
        data["name"] = f"{self.base.name}-{trial_id}"
        data["data"]["test"] = None
        data["train"].update(eval_every=1, checkpoint_every=1, checkpoint_every_steps=0)
        storage = self.train_storage or str(self.workdir / "train")
        data["run"].update(storage_path=storage, output_dir=str(self.workdir / "models"))
        data["tracking"]["log_model"] = False  # the checkpoint artifact is logged; the chosen model is the product
        if self.cpus_per_worker and not data["scaling"]["cpus_per_worker"]:
            data["scaling"]["cpus_per_worker"] = self.cpus_per_worker
        return Config.model_validate(data)


def sequence_of(cfg: Config) -> list[str]:
    """The teacher names a config distils from, in stage order."""
    if cfg.distill is None:
        return []
    if cfg.distill.stages:
        return [s.teacher.source for s in cfg.distill.stages]
    return [t.label for t in cfg.distill.teachers]


class TrialReport(TuneReportCallback):
    """A Ray Train callback: forwards each epoch's report to Tune and logs it to the trial's MLflow run.

    Only epoch reports carrying the validation metric go to Tune; the epoch becomes the
    trial's epoch (``epoch_offset`` = epochs of the earlier progressive stages). The last epoch
    (``final_epoch``) is logged but not forwarded: the trial function reports it itself, with the
    deployed speed measured after it. ASHA stops a trial whose report reaches its ``max_t``, and a
    forwarded last epoch let Tune stop the trial before its speed was measured.
    """

    def __init__(
        self,
        *,
        metric_key: str,
        tracking_uri: str,
        trial_run_id: str,
        epoch_offset: int,
        stage: int,
        objective_keys: tuple[str, ...] = (),
        cost: dict[str, float] | None = None,
        final_epoch: int | None = None,
    ):
        super().__init__()
        self.final_epoch = final_epoch
        self.metric_key = metric_key
        self.objective_keys = objective_keys
        self.cost = cost or {}  # the trial's cost/* values: every report has them, a trial ASHA stops too
        self.tracking_uri = tracking_uri
        self.trial_run_id = trial_run_id
        self.epoch_offset = epoch_offset
        self.stage = stage

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = metrics[0]
        if self.metric_key not in first:
            return
        from detkd.tracking.runs import RunLogger

        epoch = self.epoch_offset + int(first["epoch"])
        scores = {k: v for k, v in first.items() if k.startswith(("val/", "train/")) and isinstance(v, (int, float))}
        RunLogger(tracking_uri=self.tracking_uri, run_id=self.trial_run_id).metrics(scores, step=epoch)
        if self.final_epoch is not None and epoch >= self.final_epoch:
            return  # the trial function's last report carries it (see the class docstring)
        report = {**not_yet(self.objective_keys), **self.cost, **first, TRIAL_EPOCH: epoch, "stage": self.stage}
        super().after_report(run_context, [report], checkpoint)


def not_yet(keys: tuple[str, ...]) -> dict[str, float]:
    """NaN for each objective a report cannot have yet (speed before the last epoch): Tune refuses a result
    without every metric its searcher optimises."""
    return dict.fromkeys(keys, float("nan"))


def log_to_stdout() -> None:
    """A trial runs in an actor whose stdout Ray streams to the driver: the library's log lines go there."""
    logger = logging.getLogger("detkd")
    if not any(isinstance(h, TrialHandler) for h in logger.handlers):
        logger.addHandler(TrialHandler(sys.stdout))
        logger.setLevel(logging.INFO)


class TrialHandler(logging.StreamHandler):
    """Plain lines on the trial actor's stdout (one per actor, however many trials it runs)."""


def run_trial(sampled: dict[str, Any], *, job: SweepJob) -> None:
    """Ray Tune function: train one configuration; Tune hears every epoch through TrialReport."""
    from detkd.engine.launch import run_training
    from detkd.tracking.runs import RunLogger, find_runs, max_metric, run_context

    log_to_stdout()
    os.environ.update(job.storage_env)  # this trial may run on a node without the driver's storage keys
    trial_id = tune.get_context().get_trial_id()
    values = job.decode(sampled)
    cfg = job.trial_config(values, trial_id)
    sequence = sequence_of(cfg)
    tags = {
        "kind": "trial",
        "component": "trial",
        "sweep": job.name,
        "sweep_run": job.tracking.parent_run_id,
        "trial_id": trial_id,
        "teacher_sequence": " > ".join(sequence),
    }
    for k, name in enumerate(sequence):
        if name in job.teacher_runs:
            tags[f"teacher.{k}.run_id"] = job.teacher_runs[name]
    tags["teacher_runs"] = json.dumps([job.teacher_runs.get(name, "") for name in sequence])
    earlier = find_runs(
        job.tracking.uri,
        job.tracking.experiment,
        {"detkd.sweep_run": str(job.tracking.parent_run_id), "detkd.trial_id": trial_id},
    )
    with run_context(
        tracking_uri=job.tracking.uri,
        experiment=job.tracking.experiment,
        run_name=f"trial {trial_id}",
        tags=tags,
        parent_run_id=job.tracking.parent_run_id,
        resume_run_id=earlier[0].info.run_id if earlier else None,
    ) as trial_run_id:
        logger = RunLogger(tracking_uri=job.tracking.uri, run_id=trial_run_id)
        attempt = int(max_metric(job.tracking.uri, trial_run_id, "attempt") or 0) + 1
        logger.metrics({"attempt": attempt}, step=attempt)
        if attempt == 1:
            logger.params({f"tune.{k}": value_label(v) for k, v in values.items()})
        cost = trial_cost(cfg)
        logger.metrics(cost, step=0)
        ruled_out = unmet(cost, [c for c in job.constraints if c.before_training])
        if ruled_out:
            reason = "ruled out before training: " + "; ".join(ruled_out)
            log.info(f"trial {trial_id}: {reason}")
            logger.tags({"infeasible": reason})
            objectives = not_yet(job.objective_keys)
            tune.report({**objectives, TRIAL_EPOCH: 0, job.metric_key: float("nan"), INFEASIBLE: 1.0, **cost})
            return
        offsets = [0, *itertools.accumulate(stage_epochs(cfg))]  # epochs before each stage

        def callbacks(plan: RunPlan, stage: int) -> list[Any]:
            return [
                TrialReport(
                    metric_key=job.metric_key,
                    tracking_uri=job.tracking.uri,
                    trial_run_id=trial_run_id,
                    epoch_offset=offsets[stage],
                    stage=stage + 1,
                    objective_keys=job.objective_keys,
                    cost=cost,
                    final_epoch=student_epochs(cfg),
                )
            ]

        outcome = run_training(
            cfg,
            tracking=TrackingContext(
                uri=job.tracking.uri, experiment=job.tracking.experiment, parent_run_id=trial_run_id
            ),
            teacher_names=job.teacher_checkpoints,
            extra_tags={"sweep": job.name, "trial_id": trial_id},
            callbacks=callbacks,
        )
        logger.tags({"model_path": str(outcome.model_path), "train_run": outcome.run_id or ""})
        logger.metrics({f"final/{k}": v for k, v in outcome.metrics.items() if k.startswith("val/")})
        speed = trial_speed(job, cfg, Path(outcome.model_path), logger=logger, trial_id=trial_id)
        final = {job.metric_key: outcome.metrics.get(job.metric_key, float("nan")), **cost, **speed}
        reasons = unmet(final, job.constraints)
        if reasons:
            logger.tags({"infeasible": "; ".join(reasons)})
        # the last report: the last epoch's scores with the speed measured after it (what the searcher's
        # objectives, ASHA's last rung and the trial table read)
        last_epoch = {k: v for k, v in outcome.metrics.items() if k.startswith(("val/", "train/"))}
        objectives = not_yet(job.objective_keys)
        tune.report(
            {
                **objectives,
                **last_epoch,
                TRIAL_EPOCH: student_epochs(cfg),
                "stage": len(offsets) - 1,
                **final,
                INFEASIBLE: float(bool(reasons)),
            }
        )


def trial_cost(cfg: Config) -> dict[str, float]:
    """``cost/mflops`` and ``cost/params`` of the trial's untrained student (the architecture decides them)."""
    from detkd.engine.plan import open_split
    from detkd.models.cost import config_cost

    classes = cfg.model.num_classes or len(open_split(cfg.data.train, skip_invalid=True).categories)
    return {f"cost/{k}": v for k, v in config_cost(cfg, num_classes=classes).metrics().items()}


def speed_task(*, cpus: float):
    """``measure_speed`` as a Ray task on this node holding the CPUs the trial's Train worker has just given
    back: the trial function itself holds almost none, and without the reservation Tune starts the next
    trial's workers beside the timing (a 2-CPU sweep measured turns ±78% apart that way)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from detkd.serving.speed import measure_speed

    node = ray.get_runtime_context().get_node_id()  # the model files are on this node's disk
    return ray.remote(measure_speed).options(
        num_cpus=cpus,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        max_retries=0,
    )


def trial_speed(job: SweepJob, cfg: Config, model: Path, *, logger, trial_id: str) -> dict[str, float]:
    """``speed/*`` of the trained student against its reference (see ``detkd.serving.speed``), logged on the
    trial's run; empty (and the reason tagged) when there is no reference or the model cannot be exported."""
    from detkd.serving.speed import SpeedUnavailable, speed_description

    task = speed_task(cpus=job.cpus_per_worker or 1.0)
    try:
        report = job.measure_speed(cfg, model, run=lambda *args, **kwargs: ray.get(task.remote(*args, **kwargs)))
    except SpeedUnavailable as exc:
        reason = str(getattr(exc, "cause", None) or exc)  # raised in the task: its message, not Ray's traceback
        log.info(f"trial {trial_id}: no deployed speed: {reason}")
        logger.tags({"speed.unavailable": reason})
        return {}
    if report is None:  # no reference to compare with
        return {}
    metrics = {f"speed/{k}": v for k, v in report.metrics().items()}
    logger.metrics(metrics, step=student_epochs(cfg))
    logger.tags(report.tags())
    log.info(f"trial {trial_id}: deployed {speed_description(report.metrics())} against {report.reference}")
    return metrics
