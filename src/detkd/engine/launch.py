"""Driver side of a training run: plan it, open its MLflow run, run Ray Train, publish the model.

The Ray run's name carries the plan's digest of the training-relevant settings: running
the same config again resumes (or returns) the earlier run, a changed config starts afresh
instead of silently continuing someone else's checkpoints. ``fresh=True`` starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from detkd.config import Config, ConfigError
from detkd.data.records import DetectionSource
from detkd.engine.checkpoints import (
    CheckpointMismatch,
    RunFolder,
    newest_good,
    remove_strays,
    set_aside_snapshot,
    snapshot_problem,
)
from detkd.engine.faults import MARKER
from detkd.engine.plan import build_plan, open_sources, plan_stages, stage_configs
from detkd.engine.stops import StopOnUnfixable, unfixable
from detkd.engine.storage_errors import storage_outage
from detkd.engine.worker import MODEL_FILE, mismatch_message, train_loop_per_worker
from detkd.models.checkpoint import file_digest, verified_bytes
from detkd.oserrors import PermanentOSError, permanent_os_error, quiet_permanent_os_errors
from detkd.records import RunPlan, TrackingContext, TrainOutcome
from detkd.signals import terminate_on_sigterm

log = logging.getLogger(__name__)
CallbackFactory = Callable[[RunPlan, int], list[Any]]  # (plan, stage index) -> Ray Train callbacks


def tracking_context(cfg: Config, *, parent_run_id: str | None = None) -> TrackingContext:
    """A run config's tracking settings (``tracking.tracking_uri`` > MLFLOW_TRACKING_URI > local SQLite)."""
    from detkd.tracking.runs import resolve_tracking_uri

    return TrackingContext(
        uri=resolve_tracking_uri(cfg.tracking.tracking_uri),
        experiment=cfg.tracking.experiment,
        parent_run_id=parent_run_id,
    )


def storage_target(cfg: Config) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a folder, or a URI with an optional S3 endpoint.

    With an endpoint (MinIO and other S3-compatible stores), the filesystem carries the keys of the
    process that starts the run (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN) when
    it has them: Ray ships it to every worker, whose own environment may have none. Without keys
    here, workers resolve credentials the usual AWS way (their environment, instance roles)."""
    path = str(cfg.run.storage_path)
    if cfg.run.storage_endpoint and path.startswith("s3://"):
        import pyarrow.fs

        keys = {}
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            keys = {"access_key": os.environ["AWS_ACCESS_KEY_ID"], "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
            if os.environ.get("AWS_SESSION_TOKEN"):
                keys["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        filesystem = pyarrow.fs.S3FileSystem(endpoint_override=cfg.run.storage_endpoint, region=region, **keys)
        return path.removeprefix("s3://"), filesystem
    return path, None


LOCAL_HEALTH_CHECK_INTERVAL_S = "0.25"  # seconds; a cluster's own environment decides there


def ensure_ray(address: str | None = None) -> None:
    """Join ``address`` (else RAY_ADDRESS, else a head ``ray start`` recorded here), or start a private local Ray.

    See :mod:`detkd.engine.ray_instance` for why a second detkd process starts its own instance."""
    from detkd.engine.ray_instance import join_ray, resolve_address, start_local_ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    target, source = resolve_address(address)
    if target:
        join_ray(target, source=source)
    else:
        # A local Ray's processes inherit this: Ray Train's controller collects worker reports every interval
        # (2 s by default) and a worker holds one unread report, so short epochs would each wait for the poll.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_HEALTH_CHECK_INTERVAL_S)
        start_local_ray(log_to_driver=True)


def publish_model(source_dir: Path, out_dir: Path) -> Path:
    """Copy a student-only ``model.pt`` and its checksum into ``out_dir``, each file atomically; the copy is
    verified before it replaces the published one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, f"{MODEL_FILE}.sha256"):
        shutil.copyfile(source_dir / name, out_dir / f".{name}.tmp")
    verified_bytes(out_dir / f".{MODEL_FILE}.tmp")  # against its header (the sidecar is named for the final file)
    for name in (MODEL_FILE, f"{MODEL_FILE}.sha256"):
        os.replace(out_dir / f".{name}.tmp", out_dir / name)
    return out_dir / MODEL_FILE


def run_training(
    cfg: Config,
    *,
    tracking: TrackingContext | None = None,
    address: str | None = None,
    extra_tags: dict[str, str] | None = None,
    teacher_names: dict[str, Path] | None = None,
    fresh: bool = False,
    callbacks: CallbackFactory | None = None,
    cpus_per_worker: float | None = None,
    reuse_finished: bool = False,
) -> TrainOutcome:
    """Train one detector (teacher, plain or distilled student) with Ray Train; log it to MLflow.

    A config with ``distill.stages`` runs them in order (progressive distillation) and
    returns the last stage's outcome. ``callbacks(plan, stage_index)`` gives the Ray Train
    callbacks of each run (a sweep's trial forwards its reports to Ray Tune with them).
    ``cpus_per_worker`` and ``reuse_finished``: see :func:`run_plan`.
    """
    from detkd.tracking.runs import check_tracking_uri

    tracking = tracking or tracking_context(cfg)
    check_tracking_uri(tracking.uri)  # seconds, not MLflow's minutes of retries, before Ray starts
    if cfg.distill is not None and cfg.distill.stages:
        return run_progressive(
            cfg,
            tracking=tracking,
            address=address,
            extra_tags=extra_tags,
            teacher_names=teacher_names,
            fresh=fresh,
            callbacks=callbacks,
            cpus_per_worker=cpus_per_worker,
            reuse_finished=reuse_finished,
        )[-1]
    sources = open_sources(cfg)
    plan = build_plan(cfg, tracking=tracking, teacher_names=teacher_names, sources=sources)
    return run_plan(
        plan,
        address=address,
        extra_tags=extra_tags,
        fresh=fresh,
        sources=sources,
        callbacks=callbacks(plan, 0) if callbacks else None,
        cpus_per_worker=cpus_per_worker,
        reuse_finished=reuse_finished,
    )


def run_plan(
    plan: RunPlan,
    *,
    address: str | None = None,
    extra_tags: dict[str, str] | None = None,
    fresh: bool = False,
    sources: dict[str, DetectionSource] | None = None,
    callbacks: list[Any] | None = None,
    cpus_per_worker: float | None = None,
    reuse_finished: bool = False,
) -> TrainOutcome:
    """Carry out a plan: check or clear its run folder, then fit under its MLflow run and publish the model.

    ``sources`` are the plan's splits when the caller already opened them (for dataset lineage);
    ``cpus_per_worker`` is the share a scheduler gives this run (see :func:`fit`);
    ``reuse_finished`` returns the outcome of a finished run with the same settings instead of fitting."""
    if reuse_finished and not fresh:
        done = finished_outcome(plan)
        if done is not None:
            log.info(f"{plan.name}: finished before as MLflow run {done.run_id}; reusing {done.model_path}")
            return done
    if sources is None:
        sources = open_sources(plan.config)
    if fresh:
        discard_run(plan)
    else:
        check_resumable(plan)
    ensure_ray(address)
    quiet_permanent_os_errors()  # reported once, by the error this raises
    started = time.perf_counter()
    published: list[Path] = []  # the model, once training finished and it is published
    run_ids: list[str] = []
    try:
        with mlflow_run(plan, sources, extra_tags=extra_tags, resume=not fresh) as (run_id, logger):
            run_ids.append(run_id)
            result = fit(plan, run_id=run_id, callbacks=callbacks, cpus_per_worker=cpus_per_worker)
            if result.checkpoint is None:
                raise RuntimeError(f"training run {plan.ray_name} finished without a checkpoint")
            with result.checkpoint.as_directory() as folder:
                model_path = publish_model(Path(folder), plan.out_dir)
                logger.merge(Path(folder))  # what the training worker could not deliver, to its run folder's outbox
            published.append(model_path)
            metrics = dict(result.metrics or {})
            log_outcome(plan, logger, model_path, metrics)
    except Exception as exc:
        stop = permanent_stop(plan, exc, published=published, run_ids=run_ids)
        if stop is None:
            raise
        raise stop from exc
    return TrainOutcome(
        name=plan.name,
        role=plan.config.role,
        model_path=model_path,
        run_id=run_id,
        metrics=metrics,
        input_size=plan.input.model_size,
        seconds=time.perf_counter() - started,
        method=plan.config.method,
    )


def finished_outcome(plan: RunPlan) -> TrainOutcome | None:
    """A finished run with exactly this plan's settings whose model is still the published one, as an outcome.

    The experiment must hold a FINISHED run of the same Ray run name (same settings, teachers and
    data by content) that logged the published file's SHA-256, so a file republished by another
    run (or another pipeline with the same settings) is never credited to this one."""
    from detkd.tracking.runs import find_runs

    model_path = plan.out_dir / MODEL_FILE
    if not model_path.is_file():
        return None
    tags = {"detkd.ray_run": plan.ray_name, "detkd.model_sha256": file_digest(model_path)}
    finished = [r for r in find_runs(plan.tracking.uri, plan.tracking.experiment, tags) if r.info.status == "FINISHED"]
    if not finished:
        return None
    run = finished[0]
    return TrainOutcome(
        name=plan.name,
        role=plan.config.role,
        model_path=model_path.resolve(),
        run_id=run.info.run_id,
        metrics={k.removeprefix("final/"): v for k, v in run.data.metrics.items() if k.startswith("final/")},
        input_size=plan.input.model_size,
        method=plan.config.method,
    )


def fit(
    plan: RunPlan, *, run_id: str | None, callbacks: list[Any] | None = None, cpus_per_worker: float | None = None
) -> ray.train.Result:
    """Run the Ray Train job; Ctrl-C leaves a resumable run and says how to resume it; a checkpoint store that
    stopped answering (after Ray Train's retries) ends it with a StorageUnreachable.

    CPUs per worker: ``scaling.cpus_per_worker``, else ``cpus_per_worker`` (a pipeline running
    steps side by side gives each its share), else the whole cluster split over the workers.
    Not part of the config digest: where a run gets its CPUs does not make it another run.

    An error that a restart would meet again (a full disk, a corrupt image, a checkpoint that does not
    fit) ends the run at once, without Ray Train's retries (``engine/stops.py``), and is raised here as
    itself: a PermanentOSError, a DatasetError, a ConfigError."""
    from detkd.tracking.runs import sqlite_file

    cfg = plan.config
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    cpus = cfg.scaling.cpus_per_worker or cpus_per_worker or max(1, total_cpus // cfg.scaling.num_workers)
    storage_path, storage_filesystem = storage_target(cfg)
    database = sqlite_file(plan.tracking.uri)
    database = None if database is None else str(database)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "plan": plan.to_dict(),
            "run_id": run_id,
            "threads_per_worker": max(1, round(cpus)),
            "run_folder": run_folder(plan),  # where a worker finds checkpoints when Ray registered none
            "database": database,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=ray.train.RunConfig(
            name=plan.ray_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[*(callbacks or []), StopOnUnfixable(database=database)],
        ),
    )
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    terminate_on_sigterm()  # again: ray.init replaced the handler (detkd/signals.py)
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        cause = unfixable(exc, database=database)
        if cause is None:
            outage = storage_outage(exc, cfg)  # the checkpoint store stopped answering: say so, in one error
            if outage is None:
                raise
            raise outage from exc
        if isinstance(cause, CheckpointMismatch):
            raise ConfigError(str(cause)) from None
        if isinstance(cause, PermanentOSError):
            raise cause.with_note(kept_note(plan)) from None
        raise cause from None
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ray Train's own SIGINT handler aborts the run and calls sys.exit(0) inside fit(); SIGTERM arrives as
        # a KeyboardInterrupt (detkd.signals), kept as it is
        log.info(
            f"interrupted: checkpoints are kept under {cfg.run.storage_path}/{plan.ray_name}; "
            "run the same command again to resume"
        )
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise KeyboardInterrupt from exc
    except Exception as exc:
        outage = storage_outage(exc, cfg)  # the checkpoint store stopped answering: say so, in one error
        if outage is None:
            raise
        raise outage from exc


def local_run_folder(plan: RunPlan) -> Path | None:
    """The Ray run folder when storage is a local path (None for URIs such as s3://)."""
    storage = str(plan.config.run.storage_path)
    return None if "://" in storage else Path(storage) / plan.ray_name


def run_folder(plan: RunPlan) -> RunFolder:
    """The Ray run folder on the filesystem Ray Train writes it with (a local folder, or s3://...)."""
    path, filesystem = storage_target(plan.config)
    return RunFolder.at(
        f"{path.rstrip('/')}/{plan.ray_name}",
        filesystem=filesystem,
        display=f"{str(plan.config.run.storage_path).rstrip('/')}/{plan.ray_name}",
    )


def kept_note(plan: RunPlan) -> str:
    """What a stopped run keeps, for its error message: the newest good checkpoint and its step."""
    try:
        good = newest_good(run_folder(plan), logger=None)
    except OSError:
        return f"its checkpoints are kept under {run_folder(plan).display}"
    if good is None:
        return "no checkpoint was kept"
    return f"{good.name} (step {good.step}) is kept"


def permanent_stop(
    plan: RunPlan, error: BaseException, *, published: list[Path], run_ids: list[str]
) -> PermanentOSError | None:
    """The permanent OS error (full disk, read-only, permission, quota) that ended a run, saying what was
    kept; None for any other error. One from :func:`fit` already says where training stopped. A write
    that names no file here is MLflow's artifact store writing the run's files."""
    from detkd.tracking.runs import artifact_uri, sqlite_file

    database = sqlite_file(plan.tracking.uri)
    stop = permanent_os_error(error, database=None if database is None else str(database))
    if stop is None or stop.notes:
        return stop
    if stop.path is None and run_ids:
        try:
            where = f"the artifacts of MLflow run {run_ids[0]} ({artifact_uri(plan.tracking.uri, run_ids[0])})"
        except Exception:  # noqa: BLE001 - the store itself may be what failed
            where = f"the artifacts of MLflow run {run_ids[0]}"
        stop = PermanentOSError(stop.errno, where, action=stop.action)
    if published:
        return stop.with_note(
            f"training finished: its model is published at {published[0]} and its checkpoints are kept"
        )
    return stop.with_note(kept_note(plan))


def check_resumable(plan: RunPlan) -> None:
    """Before Ray starts: find the newest checkpoint that reads back whole (skipping, with a line each,
    incomplete or unreadable ones) and refuse it when it no longer fits the model. A list of checkpoints
    Ray Train could not start from (cut short by a full disk, pointing at a deleted folder) is set aside;
    stray folders older than the one resumed from are removed (``engine.checkpoints.remove_strays``)."""
    from detkd.engine.build import build_trainable

    folder = run_folder(plan)
    try:
        problem = snapshot_problem(folder, ray.__version__)
        if problem is not None:
            set_aside_snapshot(folder, problem)
        good = newest_good(folder)
        if good is not None:
            remove_strays(folder, good)
    except OSError as exc:  # storage unreachable from here: the workers find out for themselves
        log.warning(f"{folder.display}: cannot read the run's checkpoints before starting ({exc})")
        return
    if good is None:
        return
    saved = good.state.get("model")
    if not isinstance(saved, dict):
        raise ConfigError(mismatch_message(plan, f"{good.name} holds no model state"))
    expected = {k: tuple(v.shape) for k, v in build_trainable(plan, device="meta")[0].state_dict().items()}
    found = {k: tuple(v.shape) for k, v in saved.items()}
    if expected != found:
        extra = sorted(set(found) - set(expected))
        missing = sorted(set(expected) - set(found))
        reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        parts = [
            f"{len(keys)} {what}, e.g. {keys[0]}"
            for keys, what in (
                (extra, "tensors the model lacks"),
                (missing, "tensors missing"),
                (reshaped, "tensors of another shape"),
            )
            if keys
        ]
        raise ConfigError(mismatch_message(plan, f"{good.name}: " + "; ".join(parts)))


def discard_run(plan: RunPlan) -> None:
    """``--fresh``: forget the run folder (checkpoints) and the fault marker; start over."""
    folder = local_run_folder(plan)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        import pyarrow.fs

        path, filesystem = storage_target(plan.config)  # the same filesystem Ray Train writes through
        if filesystem is None:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(path)
        with contextlib.suppress(FileNotFoundError, OSError):
            filesystem.delete_dir(f"{path}/{plan.ray_name}")
    (plan.out_dir / MARKER).unlink(missing_ok=True)


@contextlib.contextmanager
def mlflow_run(
    plan: RunPlan, sources: dict[str, DetectionSource], *, extra_tags: dict[str, str] | None, resume: bool
) -> Iterator[tuple[str, Any]]:
    """Open the run's MLflow run (continuing an interrupted attempt at the same Ray run) with its lineage.

    Everything after the run's creation goes through a ``BufferedLogger``: a tracking server that goes
    away costs no training; what it missed is kept in ``plan.out_dir/tracking-outbox`` and, if still
    undelivered at the end, raises TrackingNotDelivered (after the model is published)."""
    from detkd.tracking.buffered import buffered_run
    from detkd.tracking.runs import code_version_tags

    cfg = plan.config
    tags = {
        "role": cfg.role,
        "component": "stage" if extra_tags and "stage" in extra_tags else cfg.role,
        "name": cfg.name,
        "config_digest": plan.digest,
        "ray_run": plan.ray_name,
        "input_size": plan.input.model_size,
        "method": cfg.method,
        **code_version_tags(),
        **(extra_tags or {}),
    }
    # lineage: teachers by MLflow run, in order (the file and scale alongside)
    tags["teacher_runs"] = json.dumps([t.mlflow_run_id or "" for t in plan.teachers])
    for i, teacher in enumerate(plan.teachers):
        tags[f"teacher.{i}"] = teacher.mlflow_run_id or teacher.path
        tags[f"teacher.{i}.path"] = teacher.path
        tags[f"teacher.{i}.scale"] = teacher.scale
        if teacher.mlflow_run_id:
            tags[f"teacher.{i}.run_id"] = teacher.mlflow_run_id
    resume_id = unfinished_run(plan) if resume else None
    with buffered_run(
        tracking_uri=plan.tracking.uri,
        experiment=plan.tracking.experiment,
        run_name=cfg.name,
        run_folder=plan.out_dir,
        close_timeout=cfg.tracking.outage_wait_s,
        tags=tags,
        parent_run_id=plan.tracking.parent_run_id,
        resume_run_id=resume_id,
    ) as logger:
        run_id = logger.run_id
        if resume_id:
            log.info(f"continuing MLflow run {run_id} of the interrupted attempt at {plan.ray_name}")
        else:
            logger.params(cfg.model_dump(mode="json"))
        logger.dict(plan.to_dict(), "plan.json")
        digests = {
            split: logger.dataset(
                records=dataset_records(source), source=getattr(cfg.data, split).location(), name=split, context=split
            )
            for split, source in sources.items()
        }
        logger.tags({f"dataset.{split}": digest for split, digest in digests.items()})
        yield run_id, logger


def dataset_records(source) -> list[dict[str, Any]]:
    return [
        {"image_id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height, "boxes": len(r.boxes)}
        for r in source.records
    ]


def log_split(uri: str, run_id: str, name: str, split, source: DetectionSource) -> str:
    """Log one split as a dataset input of ``run_id``; returns its digest (the same wherever it is used)."""
    from detkd.tracking.runs import log_dataset

    return log_dataset(
        tracking_uri=uri,
        run_id=run_id,
        records=dataset_records(source),
        source=split.location(),
        name=name,
        context=name,
    )


def log_outcome(plan: RunPlan, logger, model_path: Path, metrics: dict[str, Any]) -> None:
    """The final metrics, the published file's checksum tag, the file itself and (``tracking.log_model``)
    its pyfunc model, through the run's BufferedLogger (none of it waits for the server)."""
    logger.metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    logger.tags({"model_sha256": file_digest(model_path)})  # ties the published file to this run (reruns reuse it)
    logger.artifact(model_path, "checkpoint")
    logger.artifact(Path(f"{model_path}.sha256"), "checkpoint")
    if plan.config.tracking.log_model:
        logger.model(model_path, example_size=plan.input.size)


def unfinished_run(plan: RunPlan) -> str | None:
    """The MLflow run of an interrupted or crashed attempt at this Ray run, to continue its history."""
    from detkd.tracking.runs import find_runs

    runs = find_runs(plan.tracking.uri, plan.tracking.experiment, {"detkd.ray_run": plan.ray_name})
    unfinished = [r for r in runs if r.info.status in ("RUNNING", "KILLED", "FAILED")]
    return unfinished[0].info.run_id if unfinished else None


def run_progressive(
    cfg: Config,
    *,
    tracking: TrackingContext,
    address: str | None = None,
    extra_tags: dict[str, str] | None = None,
    teacher_names: dict[str, Path] | None = None,
    fresh: bool = False,
    callbacks: CallbackFactory | None = None,
    cpus_per_worker: float | None = None,
    reuse_finished: bool = False,
) -> list[TrainOutcome]:
    """Multi-teacher progressive distillation: only the student's weights travel between stages.

    Returns each stage's outcome, then the student's (the last stage published under its name)."""
    stages = stage_configs(cfg)
    shared = open_sources(cfg)  # read once; a stage whose settings change the data reads its own
    plan_stages(cfg, tracking=tracking, teacher_names=teacher_names, sources=shared)
    outcomes: list[TrainOutcome] = []
    for k in range(1, len(stages) + 1):
        outcome = run_stage(
            cfg,
            k,
            previous=outcomes[-1] if outcomes else None,
            tracking=tracking,
            address=address,
            extra_tags=extra_tags,
            teacher_names=teacher_names,
            fresh=fresh,
            callbacks=callbacks,
            sources=shared,
            cpus_per_worker=cpus_per_worker,
            reuse_finished=reuse_finished,
        )
        outcomes.append(outcome)
    outcomes.append(progressive_outcome(cfg, outcomes[-1], seconds=sum(o.seconds for o in outcomes)))
    return outcomes


def run_stage(
    cfg: Config,
    k: int,
    *,
    previous: TrainOutcome | None,
    tracking: TrackingContext,
    address: str | None = None,
    extra_tags: dict[str, str] | None = None,
    teacher_names: dict[str, Path] | None = None,
    fresh: bool = False,
    callbacks: CallbackFactory | None = None,
    sources: dict[str, DetectionSource] | None = None,
    cpus_per_worker: float | None = None,
    reuse_finished: bool = False,
) -> TrainOutcome:
    """Stage ``k`` (from 1) of a progressive student, starting from ``previous`` (stage k-1's outcome)."""
    stages = stage_configs(cfg)
    stage = stages[k - 1]
    if k > 1:
        if previous is None:
            raise ValueError(f"{cfg.name}: stage {k} starts from stage {k - 1}'s outcome; none was given")
        stage = stage.model_copy(update={"model": stage.model.model_copy(update={"weights": previous.model_path})})
    if sources is None or stage.data != cfg.data:
        sources = open_sources(stage)
    plan = build_plan(stage, tracking=tracking, teacher_names=teacher_names, sources=sources)
    tags = {**(extra_tags or {}), "progressive": cfg.name, "stage": str(k), "stages": str(len(stages))}
    if previous is not None and previous.run_id:
        tags["previous_stage_run"] = previous.run_id
    outcome = run_plan(
        plan,
        address=address,
        extra_tags=tags,
        fresh=fresh,
        sources=sources,
        callbacks=callbacks(plan, k - 1) if callbacks else None,
        cpus_per_worker=cpus_per_worker,
        reuse_finished=reuse_finished,
    )
    return outcome


def progressive_outcome(cfg: Config, last: TrainOutcome, *, seconds: float) -> TrainOutcome:
    """Publish the last stage's checkpoint under the progressive student's own name; the student's outcome."""
    out_dir = Path(stage_configs(cfg)[-1].run.output_dir).resolve() / cfg.name
    publish_model(last.model_path.parent, out_dir)
    return TrainOutcome(
        name=cfg.name,
        role=cfg.role,
        model_path=out_dir / MODEL_FILE,
        run_id=last.run_id,
        metrics=last.metrics,
        input_size=last.input_size,
        seconds=seconds,
        method="progressive",
    )
