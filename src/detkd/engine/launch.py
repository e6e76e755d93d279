"""Driver side of a training run: validate data, start the MLflow run, run Ray Train.

The Ray run's name carries a digest of the training-relevant config: running the
same config again resumes (or returns) the earlier run, a changed config starts
afresh instead of silently continuing someone else's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from detkd.config import Config, ConfigError
from detkd.engine.datasets import build_dataset
from detkd.engine.worker import MODEL_FILE, train_loop_per_worker


@dataclass
class TrainOutcome:
    name: str
    role: str
    model_path: Path
    run_id: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    input_size: int = 0
    seconds: float = 0.0
    method: str = "kd_off"


def absolute_paths(cfg: Config, base: Path | None = None) -> Config:
    """Ray workers do not share the driver's cwd: make every path absolute."""
    base = Path(base or Path.cwd())
    data = cfg.model_dump()

    def fix(value: Any) -> Any:
        if value in (None, "") or "://" in str(value):  # URIs (s3://, gs://, file://) are left as given
            return value
        return str((base / value).resolve())

    for split in ("train", "val"):
        if data["data"][split]:
            for key in ("coco", "images", "parquet"):
                data["data"][split][key] = fix(data["data"][split][key])
    for key in ("weights", "backbone_weights"):
        data["model"][key] = fix(data["model"][key])
    data["run"]["storage_path"] = fix(data["run"]["storage_path"])
    data["run"]["output_dir"] = fix(data["run"]["output_dir"])
    return Config.model_validate(data)


def config_digest(cfg: Config, teachers: list[tuple[str, float]] | None = None) -> str:
    """Digest of what changes the trained weights (not where results go or how they are logged).

    Teachers enter by content (their checkpoint checksum), so a retrained teacher
    never silently resumes a student distilled from its predecessor.
    """
    data = cfg.model_dump(mode="json", exclude={"run": True, "tracking": True, "name": True, "eval": True})
    data["train"].pop("log_every", None)
    data["teachers"] = [[_file_digest(Path(path)), scale] for path, scale in teachers or []]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def _file_digest(path: Path) -> str:
    sidecar = Path(f"{path}.sha256")
    if sidecar.is_file():
        return sidecar.read_text().split()[0]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def storage_target(cfg: Config) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a folder, or a URI with an optional S3 endpoint."""
    path = str(cfg.run.storage_path)
    if cfg.run.storage_endpoint and path.startswith("s3://"):
        import pyarrow.fs

        return path.removeprefix("s3://"), pyarrow.fs.S3FileSystem(endpoint_override=cfg.run.storage_endpoint)
    return path, None


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local Ray on this machine."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(log_to_driver=True)


def publish_model(source_dir: Path, out_dir: Path) -> Path:
    """Copy a student-only ``model.pt`` and its checksum into ``out_dir``, each file atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, f"{MODEL_FILE}.sha256"):
        shutil.copyfile(source_dir / name, out_dir / f".{name}.tmp")
        os.replace(out_dir / f".{name}.tmp", out_dir / name)
    return out_dir / MODEL_FILE


def dataset_records(dataset) -> list[dict[str, Any]]:
    return [
        {"image_id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height, "boxes": len(r.boxes)}
        for r in dataset.source.records
    ]


def run_training(
    cfg: Config,
    *,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    extra_tags: dict[str, str] | None = None,
    teacher_names: dict[str, Path] | None = None,
) -> TrainOutcome:
    """Train one detector (teacher, plain or distilled student) with Ray Train; log it to MLflow.

    A config with ``distill.stages`` runs them in order (progressive distillation)
    and returns the last stage's outcome.
    """
    if cfg.distill is not None and cfg.distill.stages:
        return run_progressive(
            cfg,
            parent_run_id=parent_run_id,
            tracking_uri=tracking_uri,
            address=address,
            extra_tags=extra_tags,
            teacher_names=teacher_names,
        )[-1]
    from detkd.engine.teachers import resolve_teachers
    from detkd.models.checkpoint import load_detector
    from detkd.tracking import RunLogger, log_dataset, log_pytorch_model, resolve_tracking_uri, run_context

    cfg = absolute_paths(cfg)
    if cfg.data.train is None:
        raise ValueError("config has no data.train split")
    teachers = resolve_teachers(
        cfg,
        names=teacher_names,
        cache_dir=Path(cfg.run.output_dir) / ".teachers",
        tracking_uri=tracking_uri or cfg.tracking.tracking_uri,
    )
    # Validate the data here, before any worker starts: a bad dataset fails in seconds with a clear message.
    train_set = build_dataset(cfg, "train", train=True)
    val_set = build_dataset(cfg, "val", train=False) if cfg.data.val is not None else None
    global_batch = cfg.train.batch_size * cfg.scaling.num_workers
    if len(train_set) < global_batch:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} per worker x {cfg.scaling.num_workers} workers "
            f"needs at least {global_batch} training images, the data has {len(train_set)}"
        )
    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.tracking_uri)
    digest = config_digest(cfg, teachers)
    ray_name = f"{cfg.name}-{digest}"
    out_dir = Path(cfg.run.output_dir) / cfg.name
    ensure_ray(address)
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    cpus = cfg.scaling.cpus_per_worker or max(1, total_cpus // cfg.scaling.num_workers)
    started = time.perf_counter()
    tags = {
        "role": cfg.role,
        "name": cfg.name,
        "config_digest": digest,
        "ray_run": ray_name,
        "input_size": cfg.input.model_size,
        "method": cfg.method,
        **(extra_tags or {}),
    }
    for i, (path, scale) in enumerate(teachers):
        tags[f"teacher.{i}"] = path
        tags[f"teacher.{i}.scale"] = scale
    resume_id = unfinished_run(uri, cfg.tracking.experiment, ray_name)
    with run_context(
        tracking_uri=uri,
        experiment=cfg.tracking.experiment,
        run_name=cfg.name,
        tags=tags,
        parent_run_id=parent_run_id,
        resume_run_id=resume_id,
    ) as run_id:
        logger = RunLogger(tracking_uri=uri, run_id=run_id)
        if resume_id:
            print(f"continuing MLflow run {run_id} of the interrupted attempt at {ray_name}", flush=True)
        else:
            logger.params(cfg.model_dump(mode="json"))
        logger.dict(cfg.model_dump(mode="json"), "config.json")
        log_dataset(
            tracking_uri=uri,
            run_id=run_id,
            records=dataset_records(train_set),
            source=str(cfg.data.train.coco or cfg.data.train.parquet),
            name=f"{cfg.name}-train",
            context="train",
        )
        if val_set is not None:
            log_dataset(
                tracking_uri=uri,
                run_id=run_id,
                records=dataset_records(val_set),
                source=str(cfg.data.val.coco or cfg.data.val.parquet),
                name=f"{cfg.name}-val",
                context="eval",
            )
        loop_config: dict[str, Any] = {
            "config": cfg.model_dump(mode="json"),
            "tracking_uri": uri,
            "run_id": run_id,
            "threads_per_worker": cpus,
            "teachers": teachers,
            "meta": {
                "name": cfg.name,
                "role": cfg.role,
                "input_size": cfg.input.model_size,
                "method": cfg.method,
                "input_scale": cfg.input.scale,
                "reference_size": cfg.input.size,
                "mlflow_run_id": run_id,
                "categories": [{"id": c.id, "name": c.name} for c in train_set.source.categories],
            },
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        loop_config["fault_marker"] = str(out_dir / ".fault-injected")  # debug.fail_at_step fires once per run
        storage_path, storage_filesystem = storage_target(cfg)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker={"CPU": cpus}
            ),
            run_config=ray.train.RunConfig(
                name=ray_name,
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            ),
        )
        try:
            result = trainer.fit()
        except (KeyboardInterrupt, SystemExit) as exc:
            # Ray Train's own SIGINT handler aborts the run and calls sys.exit(0) inside fit()
            print(
                f"interrupted: checkpoints are kept under {cfg.run.storage_path}/{ray_name}; "
                "run the same command again to resume",
                flush=True,
            )
            raise KeyboardInterrupt from exc
        if result.checkpoint is None:
            raise RuntimeError(f"training run {ray_name} finished without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            model_path = publish_model(Path(folder), out_dir)
        metrics = dict(result.metrics or {})
        logger.metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        logger.artifact(model_path, "checkpoint")
        logger.artifact(Path(f"{model_path}.sha256"), "checkpoint")
        if cfg.tracking.log_model:
            model, _ = load_detector(model_path)
            log_pytorch_model(tracking_uri=uri, run_id=run_id, model=model)
    return TrainOutcome(
        name=cfg.name,
        role=cfg.role,
        model_path=model_path,
        run_id=run_id,
        metrics=metrics,
        input_size=cfg.input.model_size,
        seconds=time.perf_counter() - started,
        method=cfg.method,
    )


def unfinished_run(tracking_uri: str, experiment: str, ray_name: str) -> str | None:
    """The MLflow run of an interrupted or crashed attempt at this Ray run, to continue its history."""
    from detkd.tracking import find_runs

    runs = find_runs(tracking_uri, experiment, {"detkd.ray_run": ray_name})
    unfinished = [r for r in runs if r.info.status in ("RUNNING", "KILLED", "FAILED")]
    return unfinished[0].info.run_id if unfinished else None


def stage_configs(cfg: Config) -> list[Config]:
    """Expand ``distill.stages`` into one run config per stage (stage k starts from stage k-1)."""
    from detkd.config import deep_merge, validate_config

    base = cfg.model_dump(mode="json")
    stages = base["distill"].pop("stages")
    base_distill = {k: v for k, v in base.pop("distill").items() if k != "teachers"}
    out = []
    for k, stage in enumerate(stages, start=1):
        data = deep_merge({**base, "distill": base_distill}, stage["settings"])
        data["distill"]["teachers"] = [stage["teacher"]]
        data["name"] = f"{cfg.name}-stage{k}"
        if k > 1:
            data["distill"]["copy_neck_head"] = False  # only the first stage may copy the teacher's neck/head
            data["distill"]["init_from_teacher"] = False
        out.append(validate_config(data, source=f"{cfg.name}: distill.stages[{k - 1}]"))
    return out


def run_progressive(
    cfg: Config,
    *,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    extra_tags: dict[str, str] | None = None,
    teacher_names: dict[str, Path] | None = None,
) -> list[TrainOutcome]:
    """Multi-teacher progressive distillation: only the student's weights travel between stages."""
    outcomes: list[TrainOutcome] = []
    stages = stage_configs(cfg)
    for k, stage in enumerate(stages, start=1):
        if outcomes:
            stage = stage.model_copy(
                update={"model": stage.model.model_copy(update={"weights": outcomes[-1].model_path})}
            )
        outcome = run_training(
            stage,
            parent_run_id=parent_run_id,
            tracking_uri=tracking_uri,
            address=address,
            extra_tags={**(extra_tags or {}), "progressive": cfg.name, "stage": str(k), "stages": str(len(stages))},
            teacher_names=teacher_names,
        )
        outcomes.append(outcome)
    final = outcomes[-1]
    # the progressive student's own name points at the last stage's checkpoint
    out_dir = Path(absolute_paths(cfg).run.output_dir) / cfg.name
    publish_model(final.model_path.parent, out_dir)
    outcomes.append(
        TrainOutcome(
            name=cfg.name,
            role=cfg.role,
            model_path=out_dir / MODEL_FILE,
            run_id=final.run_id,
            metrics=final.metrics,
            input_size=final.input_size,
            seconds=sum(o.seconds for o in outcomes),
            method="progressive",
        )
    )
    return outcomes
