"""Run, resume and finish a sweep with Ray Tune (each trial a Ray Train run, see ``trial``).

A sweep's folder holds the trials' models (``models/``) and the results: ``trials.parquet``,
``epochs.parquet``, ``best_config.yaml``, ``summary.json`` and ``plots/``; the Tune experiment
(``tune/``) and the trials' Train runs (``train/``) are there too, or under the target's
``run.storage_path`` when that is a URI (``storage``). Running the same command again continues an
interrupted sweep without redoing finished trials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from detkd.config import ConfigError
from detkd.extras import missing_extra, require
from detkd.records import TrackingContext, TrialRow
from detkd.sweeps.confirm import confirm_speeds
from detkd.sweeps.orphans import OrphanedGroups
from detkd.sweeps.space import LoadedSpace, Parameter, SweepBudget, student_epochs
from detkd.sweeps.storage import SweepStorage, storage_keys, sweep_storage
from detkd.sweeps.trial import TRIAL_EPOCH, SweepJob, run_trial

STATE_FILE = "sweep.json"
TRIAL_DRIVER_CPU = 0.01  # the Tune function only waits on its Train run; the workers hold the CPUs
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep searches (``detkd tune``'s options over the space's ``budget``)."""

    samples: int
    max_concurrent: int
    scheduler: str
    search: str
    grace_epochs: int
    reduction_factor: float
    max_failures: int
    seed: int
    sampler: str = "tpe"

    @classmethod
    def from_budget(cls, budget: SweepBudget, **overrides: Any) -> SweepOptions:
        values = budget.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        checked = SweepBudget.model_validate(values)  # the same checks as the space file's budget
        return cls(**checked.model_dump())


@dataclass
class SweepOutcome:
    name: str
    workdir: Path
    complete: bool
    sweep_run_id: str
    rows: list[TrialRow] = field(default_factory=list)
    best: dict[str, Any] | None = None  # the best trial's row, with test scores when there is a test split
    best_config: Path | None = None
    best_model: Path | None = None

    @property
    def trials(self) -> list[dict[str, Any]]:
        """The trial rows as ``trials.parquet`` has them."""
        return [row.to_dict() for row in self.rows]


def run_sweep(
    loaded: LoadedSpace,
    *,
    options: SweepOptions,
    address: str | None = None,
    resume: bool = False,
    fresh: bool = False,
    tracking: TrackingContext | None = None,
) -> SweepOutcome:
    """Run (or continue) a sweep; ``tracking.parent_run_id`` nests it in a pipeline's run."""
    from detkd.engine.launch import ensure_ray
    from detkd.sweeps import report
    from detkd.tracking.runs import RunLogger, check_tracking_uri, run_context

    if options.search == "optuna":
        require("optuna", why="--search optuna")  # before any folder, run or Ray
    workdir = loaded.workdir()
    storage = sweep_storage(loaded.base, name=loaded.name, workdir=workdir)
    digest = sweep_digest(loaded, options)
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
        if storage.remote:
            storage.discard()
    state = read_state(storage)
    restorable = check_restorable(storage, state, digest, resume=resume)
    tracking = tracking or target_tracking(loaded)
    check_tracking_uri(tracking.uri)
    ensure_ray(address)
    workdir.mkdir(parents=True, exist_ok=True)
    with run_context(
        tracking_uri=tracking.uri,
        experiment=tracking.experiment,
        run_name=f"sweep:{loaded.name}",
        tags={
            "kind": "sweep",
            "component": "sweep",
            "sweep": loaded.name,
            "space": str(loaded.path),
            "workdir": str(workdir),
            "sweep_storage": storage.root,
        },
        parent_run_id=tracking.parent_run_id,
        resume_run_id=state.get("sweep_run_id") if restorable else None,
    ) as sweep_run_id:
        sweep_log = RunLogger(tracking_uri=tracking.uri, run_id=sweep_run_id)
        if not restorable:
            write_state(storage, {"digest": digest, "sweep_run_id": sweep_run_id, "complete": False})
            sweep_log.params({"space": loaded.space.model_dump(mode="json"), "options": options.__dict__})
        stored = f" (trials stored under {storage.shown})" if storage.remote else ""
        log.info(f"sweep {loaded.name}: {'continuing' if restorable else 'starting'} under {workdir}{stored}")
        job = sweep_job(loaded, options, tracking=replace(tracking, parent_run_id=sweep_run_id), storage=storage)
        results = build_tuner(loaded, options, job, storage=storage, restorable=restorable).fit()
        outcome, epochs = collect_trials(loaded, options, job, results, sweep_run_id=sweep_run_id)
        report.finish(outcome, job=job, epochs=epochs, sweep_log=sweep_log)
        write_state(storage, {"digest": digest, "sweep_run_id": sweep_run_id, "complete": True})
        if outcome.best is None and loaded.constraints and any(r.model_path for r in outcome.rows):
            raise SweepFailed(
                f"sweep {loaded.name}: no trial that trained to the end meets "
                f"{', '.join(str(c) for c in loaded.constraints)}; every trial and what it missed: "
                f"{workdir / 'pareto.md'}"
            )
        if outcome.best is None:
            failed = [r.trial_id for r in outcome.rows if r.state == "ERROR"]
            raise SweepFailed(
                f"sweep {loaded.name}: no trial trained to the end ({len(failed)} of {len(outcome.rows)} failed); "
                f"their errors are under {storage.shown}/tune/*/error.txt"
            )
    return outcome


def check_restorable(storage: SweepStorage, state: dict[str, Any], digest: str, *, resume: bool) -> bool:
    """Whether the sweep's storage holds a Tune experiment to continue; a ConfigError when it is another sweep's."""
    restorable = tune.Tuner.can_restore(storage.tune, storage_filesystem=storage.filesystem)
    if resume and not restorable:
        raise ConfigError(f"--resume: no sweep to resume under {storage.shown}; run without --resume to start it")
    if restorable and state.get("digest") != digest:
        raise ConfigError(
            f"{storage.shown}: the sweep there was started from another space, target or budget; "
            "start over with --fresh, or set the space's workdir elsewhere"
        )
    return restorable


def sweep_job(
    loaded: LoadedSpace, options: SweepOptions, *, tracking: TrackingContext, storage: SweepStorage
) -> SweepJob:
    """What every trial needs: the target, its parameters, the teachers (trained once, here), its CPUs and
    where its Train run stores its checkpoints."""
    checkpoints, runs = prepare_teachers(loaded, tracking=tracking)
    return SweepJob(
        name=loaded.name,
        base=loaded.base,
        parameters=loaded.parameters,
        workdir=loaded.workdir(),
        tracking=tracking,
        metric_key=loaded.metric_key,
        teacher_checkpoints=checkpoints,
        teacher_runs=runs,
        cpus_per_worker=worker_cpus(loaded, options),
        train_storage=storage.train,
        storage_env=storage_keys(storage),
        objectives=loaded.objectives,
        constraints=loaded.constraints,
        speed=loaded.space.speed,
    )


def build_tuner(
    loaded: LoadedSpace, options: SweepOptions, job: SweepJob, *, storage: SweepStorage, restorable: bool
) -> tune.Tuner:
    """A new Tuner, or the interrupted one restored (its errored trials retried)."""
    from detkd.sweeps import report

    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": TRIAL_DRIVER_CPU})
    space = param_space(loaded.parameters, options.search, where=str(loaded.path))
    if restorable:
        return tune.Tuner.restore(
            storage.tune,
            trainable=trainable,
            resume_errored=True,
            param_space=space,
            storage_filesystem=storage.filesystem,
        )
    table = report.LiveTable(metric_key=job.metric_key, parameters=[p.name for p in loaded.parameters])
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune_config(loaded, options),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            callbacks=[table, OrphanedGroups()],
            verbose=0,
        ),
    )


def collect_trials(loaded: LoadedSpace, options: SweepOptions, job: SweepJob, results, *, sweep_run_id: str):
    """(SweepOutcome, epochs frame) from Tune's results, the tables written and the trials' runs ended;
    KeyboardInterrupt when trials are still to run (the sweep was interrupted)."""
    from detkd.sweeps import report

    rows, epochs, configs = report.trial_rows(results, job=job)
    complete = len(rows) == expected_trials(loaded.parameters, options) and all(row.finished for row in rows)
    if complete and confirm_speeds(rows, configs, job=job):
        report.mark_front(rows, job=job)  # on the speeds measured again
    outcome = SweepOutcome(
        name=loaded.name, workdir=job.workdir, complete=complete, sweep_run_id=sweep_run_id, rows=rows
    )
    report.write_tables(job.workdir, rows, epochs)
    report.close_trial_runs(rows, tracking_uri=job.tracking.uri)
    if not complete:
        log.info(f"interrupted: finished trials are kept under {job.workdir}; run the same command again to continue")
        raise KeyboardInterrupt
    return outcome, epochs


class SweepFailed(RuntimeError):
    """A sweep ended without a trial that trained its whole budget."""


def expected_trials(parameters: tuple[Parameter, ...], options: SweepOptions) -> int:
    """How many trials the sweep makes: ``samples`` times every grid point."""
    count = options.samples
    for p in parameters:
        if p.kind == "grid" or (p.categorical and options.search == "grid"):
            count *= len(p.values)
    return count


def target_tracking(loaded: LoadedSpace) -> TrackingContext:
    if loaded.pipeline is not None:
        from detkd.pipeline.spec import tracking_context

        return tracking_context(loaded.pipeline)
    from detkd.engine.launch import tracking_context

    return tracking_context(loaded.base)


def sweep_digest(loaded: LoadedSpace, options: SweepOptions) -> str:
    """What decides the trials: the space, its target's config and the search (not the concurrency)."""
    data = {
        "space": loaded.space.model_dump(mode="json", exclude={"budget"}),
        "base": loaded.base.model_dump(mode="json"),
        "search": {k: v for k, v in options.__dict__.items() if k != "max_concurrent"},
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_state(storage: SweepStorage) -> dict[str, Any]:
    data = storage.read(STATE_FILE)
    return json.loads(data) if data is not None else {}


def write_state(storage: SweepStorage, state: dict[str, Any]) -> None:
    storage.write(STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())


def worker_cpus(loaded: LoadedSpace, options: SweepOptions) -> float:
    """CPUs per Train worker so that ``max_concurrent`` trials (and their drivers) fit the cluster."""
    import ray

    if loaded.base.scaling.cpus_per_worker:
        return loaded.base.scaling.cpus_per_worker
    total = float(ray.cluster_resources().get("CPU", 1))
    per_trial = (total - options.max_concurrent * TRIAL_DRIVER_CPU) / options.max_concurrent
    return max(0.05, int(100 * per_trial / loaded.base.scaling.num_workers) / 100)


def param_space(parameters: tuple[Parameter, ...], search: str, *, where: str) -> dict[str, Any]:
    """Tune's search space: categorical values as their labels, ranges as Tune distributions."""
    space: dict[str, Any] = {}
    errors = []
    for p in parameters:
        key = f"{where}: parameters.{p.name}"
        if p.categorical:
            labels = list(p.labels())
            if p.kind == "grid" and search == "optuna":
                errors.append(f"{key}: grid cannot be searched by optuna; make it a choice")
            elif p.kind == "grid" or search == "grid":
                space[p.name] = tune.grid_search(labels)
            else:
                space[p.name] = tune.choice(labels)
        elif search == "grid":
            errors.append(f"{key}: {p.kind} cannot be enumerated by --search grid; give choice or grid values")
        elif p.kind == "uniform":
            space[p.name] = tune.uniform(p.low, p.high)
        elif p.kind == "loguniform":
            space[p.name] = tune.loguniform(p.low, p.high)
        elif p.kind == "randint":
            space[p.name] = tune.randint(int(p.low), int(p.high))
        elif p.kind == "quniform":
            space[p.name] = tune.quniform(p.low, p.high, p.q)
    if errors:
        raise ConfigError("\n".join(errors))
    return space


def tune_config(loaded: LoadedSpace, options: SweepOptions) -> tune.TuneConfig:
    """Tune's settings: ASHA stops trials on the accuracy objective; the searcher (optuna) sees every objective
    and constraint. The scheduler and the searcher carry their own metrics, so TuneConfig names none."""
    epochs = student_epochs(loaded.base)
    if options.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr=TRIAL_EPOCH,
            metric=loaded.metric_key,
            mode="max",
            max_t=epochs,
            grace_period=min(options.grace_epochs, epochs),
            reduction_factor=options.reduction_factor,
            stop_last_trials=False,  # a trial that reaches the last epoch finishes: publishes its model, ends its runs
        )
    else:
        scheduler = FIFOScheduler()
    if options.search == "optuna":
        try:
            from detkd.sweeps.search import ConstrainedOptunaSearch

            search_alg = ConstrainedOptunaSearch(
                objectives=loaded.objectives,
                constraints=loaded.constraints,
                sampler_name=options.sampler,
                seed=options.seed,
            )
        except (ImportError, AssertionError) as exc:
            raise missing_extra("optuna", why="--search optuna", detail=str(exc)) from None
    else:
        search_alg = BasicVariantGenerator(random_state=options.seed, max_concurrent=options.max_concurrent)
    return tune.TuneConfig(
        num_samples=options.samples,
        # a Searcher (optuna) is limited here; the variant generator above limits itself
        max_concurrent_trials=options.max_concurrent if options.search == "optuna" else None,
        scheduler=scheduler,
        search_alg=search_alg,
    )


def prepare_teachers(loaded: LoadedSpace, *, tracking: TrackingContext) -> tuple[dict[str, Path], dict[str, str]]:
    """Train the pipeline teachers the trials use, once (or find them again): name -> (checkpoint, run id)."""
    if loaded.pipeline is None or not loaded.needed_teachers:
        return {}, {}
    from detkd.pipeline.spec import ensure_synthetic_data, model_config

    spec = loaded.pipeline
    if spec.data.synth is not None:
        ensure_synthetic_data(spec)
    checkpoints: dict[str, Path] = {}
    runs: dict[str, str] = {}
    for entry in spec.teachers:
        if entry.name not in loaded.needed_teachers:
            continue
        cfg = model_config(spec, entry, role="teacher")
        path, run_id = find_or_train(cfg, tracking=tracking, names=checkpoints)
        checkpoints[entry.name], runs[entry.name] = path, run_id
    return checkpoints, runs


def find_or_train(cfg, *, tracking: TrackingContext, names: dict[str, Path]) -> tuple[Path, str]:
    """A teacher's published checkpoint when it was trained from this exact plan, else train it now."""
    from detkd.engine.launch import run_training
    from detkd.engine.plan import build_plan
    from detkd.models.checkpoint import CheckpointError, read_detector_payload

    plan = build_plan(cfg, tracking=tracking, teacher_names=names)
    published = plan.out_dir / "model.pt"
    if published.is_file():
        try:
            meta = read_detector_payload(published).get("meta", {})
        except CheckpointError:
            meta = {}
        if meta.get("plan", {}).get("digest") == plan.digest:
            log.info(f"teacher {cfg.name}: found {published} (MLflow run {meta.get('mlflow_run_id')})")
            return published, str(meta.get("mlflow_run_id") or "")
    log.info(f"teacher {cfg.name}: training it once for the sweep")
    outcome = run_training(cfg, tracking=tracking, teacher_names=names)
    return outcome.model_path, outcome.run_id or ""
