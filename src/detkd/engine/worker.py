"""The Ray Train side of a run: each worker sets up the plain-torch loop, resumes, trains, reports.

The worker receives the run plan (a JSON-able dict) and the MLflow run id; everything
else it builds from the plan, so the same function runs on a laptop or any cluster node.
Checkpoints go through ``ray.train.report``; only rank 0 writes files and logs to MLflow.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from detkd.engine import rng
from detkd.engine.checkpoints import MODEL_FILE, TRAIN_STATE, CheckpointMismatch, GoodCheckpoint, RunFolder, newest_good
from detkd.engine.evaluate import evaluate_distributed
from detkd.engine.faults import FaultInjection
from detkd.engine.loop import ProgressLog, StepHook, TrainRun, reduce_means, setup, train_one_epoch
from detkd.engine.stops import WORKER_ERROR_LOGGER, quiet_handled_errors, unfixable
from detkd.models.checkpoint import save_detector, save_payload
from detkd.oserrors import PermanentOSError, as_permanent, quiet_permanent_os_errors
from detkd.records import RunPlan

# Ray Train routes worker logging to the driver console and its log files; print() may be echoed twice.
log = logging.getLogger("detkd.train")


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report and checkpoint at INFO; that drowns the progress lines.

    Its loggers are named by file path (``logging.getLogger(__file__)``), so match on that.
    """
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(("execution/context.py", "execution/storage.py")) or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)


def stops_unfixable(train_fn):
    """An error a restart would meet again leaves the worker as detkd's own error (see engine/stops.py),
    whose traceback Ray need not print: the driver reports it in one line."""

    @functools.wraps(train_fn)
    def wrapped(loop_config: dict[str, Any]) -> None:
        quiet_handled_errors(WORKER_ERROR_LOGGER)
        quiet_permanent_os_errors()
        try:
            train_fn(loop_config)
        except Exception as exc:
            cause = unfixable(exc, database=loop_config.get("database"))
            if cause is None or cause is exc:
                raise
            log.debug("unfixable error in the training function", exc_info=True)
            raise cause from None

    return wrapped


@stops_unfixable
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: setup, resume, then epochs of train / evaluate / checkpoint."""
    plan = RunPlan.from_dict(loop_config["plan"])
    cfg = plan.config
    quiet_ray_train_reports()
    log.setLevel(logging.INFO)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(loop_config.get("threads_per_worker", 1)))
    rng.seed_everything(cfg.seed + rank)
    run = setup(
        plan, rank=rank, world_size=world, device=ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model
    )
    unknown_to_ray = resume(run, plan, rank=rank, world_size=world, folder=loop_config.get("run_folder"))
    logger = mlflow_logger(plan, loop_config.get("run_id")) if rank == 0 else None
    if logger and run.state.step > 0:  # a rerun or a restart after a lost worker: the run's record says so
        logger.metrics({"resumed_from_step": run.state.step}, step=run.state.step)
    carry = logger.carry if logger else None
    report = CheckpointReport(plan, run, rank=rank, run_id=loop_config.get("run_id"), carry=carry)
    hooks: list[StepHook] = [
        ProgressLog(
            name=cfg.name,
            every=cfg.train.log_every,
            total_steps=run.total_steps,
            steps_per_epoch=run.steps_per_epoch,
            epochs=cfg.train.epochs,
            world_size=world,
            rank=rank,
            sink=(lambda values, step: logger.metrics(values, step=step)) if logger else None,
        ),
        report.every_steps_hook(cfg.train.checkpoint_every_steps),
    ]
    if cfg.debug.fail_at_step:
        hooks.append(FaultInjection.from_config(cfg.debug, world_size=world, rank=rank, out_dir=plan.out_dir))
    while run.state.step < run.total_steps:
        epoch, offset = divmod(run.state.step, run.steps_per_epoch)
        run.sampler.set_epoch(epoch, start_batch=offset)
        train_means = train_one_epoch(run, clip_grad_norm=cfg.optim.clip_grad_norm, hooks=hooks)
        metrics = end_of_epoch(plan, run, train_means, rank=rank, world_size=world)
        logged = {k: v for k, v in metrics.items() if k.startswith(("val/", "ema/"))}
        if logger and logged:
            logger.metrics(logged, step=run.state.step)
        last = run.state.step >= run.total_steps
        if last or metrics["epoch"] % cfg.train.checkpoint_every == 0:
            report.save(metrics)
        else:
            ray.train.report(metrics)
    if unknown_to_ray and not report.reported:
        # resumed at the end from a checkpoint Ray did not register: report it, or Ray's result would be its
        # latest registered one (older, or none) and that model would be published
        report.save(end_of_epoch(plan, run, {}, rank=rank, world_size=world))


def resume(run: TrainRun, plan: RunPlan, *, rank: int, world_size: int, folder: RunFolder | None = None) -> bool:
    """Continue from the newest checkpoint that reads back whole (a rerun, or a restart after a lost worker),
    saying which newer ones were skipped and why (a copy cut short by a full disk or a killed worker).

    Returns whether that checkpoint is one Ray Train did not register (not its latest)."""
    latest = ray.train.get_checkpoint()
    found = resume_point(latest, folder, say=rank == 0)
    if found is None:
        return False
    state = found.state
    try:
        run.state.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointMismatch(mismatch_message(plan, str(exc).splitlines()[0])) from None
    if len(state["rng"]) == world_size:  # same world size: every worker continues its own random stream
        rng.restore(state["rng"][rank])
    if rank == 0:
        ema = f" (EMA of {run.state.ema.updates} updates)" if run.state.ema is not None else ""
        log.info(f"[{plan.name}] resumed from step {run.state.step}/{run.total_steps}{ema} ({found.name})")
    return latest is None or latest.path.rstrip("/").rsplit("/", 1)[-1] != found.name


def resume_point(
    checkpoint: ray.train.Checkpoint | None, folder: RunFolder | None, *, say: bool
) -> GoodCheckpoint | None:
    """The newest good checkpoint of the run folder: the folder of Ray's latest checkpoint, read through its
    filesystem, else ``folder`` (Ray has none when its list of checkpoints was set aside or none was
    registered). Newest by name, not Ray's latest: a checkpoint copied whole but not yet registered when
    the driver stopped (SIGTERM) is newer than Ray's latest, and is where training stopped."""
    if checkpoint is not None:
        parent = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
        folder = RunFolder(checkpoint.filesystem, parent, folder.display if folder is not None else parent)
    if folder is None:
        return None
    return newest_good(folder, logger=log if say else None)


def mismatch_message(plan: RunPlan, detail: str) -> str:
    folder = f"{plan.config.run.storage_path}/{plan.ray_name}"
    return (
        f"{folder}: this run's checkpoint does not fit the model the current code builds ({detail}). "
        "Start the run over with --fresh, or point run.storage_path (a pipeline's workdir) somewhere else"
    )


def end_of_epoch(
    plan: RunPlan, run: TrainRun, train_means: dict[str, float], *, rank: int, world_size: int
) -> dict[str, Any]:
    """The epoch's report: mean training terms over workers, plus validation scores when due.

    ``val/...`` scores the published detector (the EMA's average when ``train.ema`` is on); with EMA,
    the final evaluation also scores the raw weights as ``val/AP_raw`` (once: it costs a second pass).
    """
    cfg = plan.config
    epochs_done = run.state.step // run.steps_per_epoch
    metrics: dict[str, Any] = {
        "epoch": epochs_done,
        "step": run.state.step,
        **{f"train/{k}": v for k, v in reduce_means(train_means).items()},
        **run.state.ema_metrics(),
    }
    last = run.state.step >= run.total_steps
    due = cfg.train.eval_every and epochs_done % cfg.train.eval_every == 0
    if run.val_set is None or not (last or due):
        return metrics
    if run.state.ema is not None:
        run.state.ema.sync()  # every worker scores its share of images with rank 0's average
    scores = validate(plan, run, run.state.published, rank=rank, world_size=world_size)
    if scores is not None:
        metrics.update({f"val/{k}": v for k, v in scores.items()})
        log.info(
            f"[{cfg.name}] epoch {epochs_done} val AP {scores['AP']:.4f} AP50 {scores['AP50']:.4f} "
            f"APs {scores['APs']:.4f}" + (" (EMA weights)" if run.state.ema is not None else "")
        )
    if last and run.state.ema is not None:
        raw = validate(plan, run, run.state.student, rank=rank, world_size=world_size)
        if raw is not None:
            metrics["val/AP_raw"] = raw["AP"]
            log.info(f"[{cfg.name}] raw weights (no EMA): val AP {raw['AP']:.4f}")
    return metrics


def validate(
    plan: RunPlan, run: TrainRun, model: torch.nn.Module, *, rank: int, world_size: int
) -> dict[str, float] | None:
    """COCO scores of ``model`` on the validation split (rank 0; None elsewhere). A collective."""
    cfg = plan.config
    return evaluate_distributed(
        model,
        run.val_set,
        device=run.device,
        batch_size=cfg.eval.batch_size,
        score_thresh=cfg.eval.score_thresh,
        detections_per_img=cfg.eval.detections_per_img,
        rank=rank,
        world_size=world_size,
    )


def mlflow_logger(plan: RunPlan, run_id: str | None):
    """Rank 0's logger: it never waits for the tracking server. What it cannot deliver waits in a folder of
    this node's temp dir, and the final checkpoint carries it to the driver (``CheckpointReport.carry``)."""
    if not run_id:
        return None
    import os

    from detkd.tracking.buffered import BufferedLogger
    from detkd.tracking.delivery import delivery_env

    delivery_env()  # per process: this worker's only MLflow traffic is this logger's
    folder = Path(tempfile.gettempdir()) / f"detkd-outbox-{run_id}-{os.getpid()}"
    return BufferedLogger(tracking_uri=plan.tracking.uri, run_id=run_id, folder=folder)


class CheckpointReport:
    """Write a checkpoint (rank 0) and report it to Ray Train (every rank).

    A checkpoint folder holds ``train_state.pt`` (model, optimizer, scheduler, scaler, step, the EMA
    state when on, every worker's RNG, the plan) and ``model.pt`` (the published student alone: its EMA
    average when ``train.ema`` is on, with the plan in its meta).
    """

    def __init__(
        self, plan: RunPlan, run: TrainRun, *, rank: int, run_id: str | None, carry: Callable[[Path], Any] | None = None
    ) -> None:
        self.plan, self.run, self.rank, self.run_id = plan, run, rank, run_id
        self.carry = carry  # rank 0's logger: the last checkpoint takes what it could not deliver to MLflow
        self.reported = 0  # checkpoints reported by this attempt

    def model_meta(self, metrics: dict[str, Any]) -> dict[str, Any]:
        cfg = self.plan.config
        return {
            "plan": self.plan.to_dict(),
            "name": cfg.name,
            "role": cfg.role,
            "method": cfg.method,
            "mlflow_run_id": self.run_id,
            "step": self.run.state.step,
            **self.ema_meta(),
            **{k: v for k, v in metrics.items() if k.startswith("val/")},
        }

    def ema_meta(self) -> dict[str, Any]:
        """``{"ema": {decay, warmup, updates}}`` when the model file holds an EMA average, else nothing."""
        ema = self.run.state.ema
        return {} if ema is None else {"ema": {"decay": ema.decay, "warmup": ema.warmup, "updates": ema.updates}}

    def save(self, metrics: dict[str, Any]) -> None:
        states = gather_objects(rng.capture())  # a collective: every rank takes part
        if self.run.state.ema is not None:
            self.run.state.ema.sync()  # rank 0's average is saved: every worker continues from it, as on resume
        metrics = {**metrics, **self.run.state.ema_metrics()}
        name = f"checkpoint_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"  # Ray's own form: name order is age order
        try:
            with tempfile.TemporaryDirectory(prefix="detkd-ckpt-") as folder:
                checkpoint = None
                if self.rank == 0:
                    payload = {**self.run.state.state_dict(), "rng": states, "plan": self.plan.to_dict()}
                    save_payload(Path(folder) / TRAIN_STATE, payload)
                    save_detector(Path(folder) / MODEL_FILE, self.run.state.published, meta=self.model_meta(metrics))
                    if self.carry is not None and self.run.state.step >= self.run.total_steps:
                        self.carry(Path(folder))
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                    if self.run.state.ema is not None:
                        log.info(
                            f"[{self.plan.name}] checkpoint at step {self.run.state.step}: EMA of "
                            f"{metrics['ema/updates']:.0f} updates, decay {metrics['ema/decay']:.6f}"
                        )
                # Ray copies the folder into storage as ``name`` (rank 0's name is every rank's)
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if self.rank == 0 else None)
            self.reported += 1
        except OSError as exc:
            stop = self.stopped(exc, name)
            if stop is None:
                raise
            raise stop from exc

    def stopped(self, error: OSError, name: str) -> PermanentOSError | None:
        """A checkpoint write that failed for good, as the error that ends the run, naming the checkpoint."""
        stop = as_permanent(error)
        if stop is None:
            return None
        if stop.path is None:  # pyarrow's copy into storage names no file
            cfg = self.plan.config
            stop = PermanentOSError(stop.errno, f"{cfg.run.storage_path}/{self.plan.ray_name}/{name}")
        return stop.with_note(f"training stopped at step {self.run.state.step} of {self.run.total_steps}")

    def every_steps_hook(self, every: int) -> StepHook:
        """Step hook: a checkpoint every ``every`` steps between epoch ends (0: never)."""

        def hook(state, result, batch_images) -> None:
            spe = self.run.steps_per_epoch
            epoch_end = state.step % spe == 0 or state.step >= self.run.total_steps
            if every and state.step % every == 0 and not epoch_end:
                self.save({"epoch": state.step / spe, "step": state.step})

        return hook


def gather_objects(obj: Any) -> list[Any]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
