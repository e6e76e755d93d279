"""Run a pipeline spec: data -> teachers -> students -> evaluation, with MLflow lineage.

One parent MLflow run per pipeline run and one child run per component.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

from detkd.config import Config, ConfigError
from detkd.pipeline.spec import (
    PipelineSpec,
    RegisterGate,
    TuneStep,
    check_backbone_teachers,
    data_splits,
    ensure_synthetic_data,
    model_config,
    tracking_context,
)
from detkd.records import SummaryRow, TrainOutcome

log = logging.getLogger(__name__)


def run_pipeline(
    spec: PipelineSpec, *, address: str | None = None, fresh: bool = False, parallel: int = 1
) -> list[SummaryRow]:
    """Run every step; returns one summary row per trained model. ``fresh`` retrains every model;
    ``parallel`` steps at most train at once (independent ones, when the cluster has room)."""
    from detkd.engine.launch import ensure_ray
    from detkd.tracking.runs import RunLogger, TrackingUnreachable, check_reachable, check_tracking_uri

    spec = spec.model_copy(update={"workdir": spec.workdir.resolve()})
    check_tracking_uri(tracking_context(spec).uri)
    check_backbone_teachers(spec)
    started = time.perf_counter()
    parent_id = open_pipeline_run(spec)
    try:
        run_data_step(spec, parent_id)
        ensure_ray(address)
        execution = run_model_steps(spec, parent_id, address=address, fresh=fresh, parallel=parallel)
        if not execution.ok:
            RunLogger(tracking_uri=tracking_context(spec).uri, run_id=parent_id).tags(
                {"failed_steps": json.dumps(list(execution.failed)), "blocked_steps": json.dumps(execution.blocked)}
            )
            raise PipelineFailed(execution)
        outcomes = [execution.results[name] for name in final_models(spec)]
        check_reachable(tracking_context(spec).uri)  # evaluation and registration need the server: gone, say so
        rows = run_evaluate_and_register(spec, outcomes, parent_id)
        close_pipeline_run(spec, parent_id, rows, seconds=time.perf_counter() - started)
    except BaseException as exc:
        try:
            end_pipeline_run(spec, parent_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except TrackingUnreachable as closing:  # the failure the user must see is exc, not this
            log.warning(f"{closing}: the pipeline's MLflow run {parent_id} stays RUNNING")
        raise
    return rows


def open_pipeline_run(spec: PipelineSpec, *, run_key: str = "") -> str:
    """The pipeline's parent MLflow run, left RUNNING: every step's run is its child (steps may be other processes).

    Tagged ``detkd.pipeline_key`` (the pipeline's name and workdir: what a rerun shares) and, when the
    last parent run of the same pipeline failed or was stopped, ``detkd.rerun_of`` = that run.
    ``run_key`` (an orchestrator's id of this run, e.g. KFP's run id) becomes ``detkd.run_key``, by which
    ``end_pipeline_run_by_key`` finds the run again."""
    from detkd.tracking.runs import RunLogger, code_version_tags, open_parent_run

    tracking = tracking_context(spec)
    key = pipeline_key(spec)
    previous = previous_pipeline_run(spec, key)
    tags = {
        "pipeline": spec.name,
        "kind": "pipeline",
        "component": "pipeline",
        "pipeline_key": key,
        "spec_digest": spec_digest(spec),
        **code_version_tags(),
    }
    if run_key:
        tags["run_key"] = run_key
    if previous is not None and previous.info.status in ("FAILED", "KILLED"):
        tags["rerun_of"] = previous.info.run_id
    run_id = open_parent_run(tracking.uri, tracking.experiment, run_name=f"pipeline:{spec.name}", tags=tags)
    if "rerun_of" in tags:
        log.info(f"pipeline {spec.name}: MLflow run {run_id} reruns {tags['rerun_of']}, which {previous.info.status}")
    logger = RunLogger(tracking_uri=tracking.uri, run_id=run_id)
    logger.params({"pipeline": spec.model_dump(mode="json", by_alias=True)})
    return run_id


def pipeline_key(spec: PipelineSpec) -> str:
    """Which parent runs are runs of the same pipeline: the same name and workdir (its finished steps are
    reused from there), whatever settings were changed to fix a failure."""
    return hashlib.sha256(f"{spec.name}\n{Path(spec.workdir).resolve()}".encode()).hexdigest()[:16]


def spec_digest(spec: PipelineSpec) -> str:
    """The spec's settings as run (overrides applied), to tell whether a rerun changed them."""
    text = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def previous_pipeline_run(spec: PipelineSpec, key: str):
    """The newest parent run of the same pipeline (None when there is none)."""
    from detkd.tracking.runs import find_runs

    tracking = tracking_context(spec)
    runs = find_runs(tracking.uri, tracking.experiment, {"detkd.kind": "pipeline", "detkd.pipeline_key": key})
    return runs[0] if runs else None


def end_pipeline_run(spec: PipelineSpec, parent_id: str, status: str) -> None:
    from detkd.tracking.runs import end_run

    end_run(tracking_context(spec).uri, parent_id, status)


def end_pipeline_run_by_key(spec: PipelineSpec, run_key: str, *, status: str, error: str = "") -> str | None:
    """What a pipeline's exit handler does: end the parent run opened with ``run_key`` with ``status``.

    FINISHED only makes sure the run is closed (its last step normally closed it already); FAILED or
    KILLED also ends its children still RUNNING (a step whose process ended without closing its run)
    and records ``error`` as ``detkd.error``. Returns the run id, None when the pipeline failed before
    its run was opened."""
    from detkd.tracking.runs import RunLogger, child_runs, find_runs

    tracking = tracking_context(spec)
    found = find_runs(tracking.uri, tracking.experiment, {"detkd.kind": "pipeline", "detkd.run_key": run_key})
    if not found:
        log.info(f"pipeline {spec.name}: no MLflow run was opened for run {run_key}; nothing to close")
        return None
    parent = found[0]
    parent_id = parent.info.run_id
    if status == "FINISHED":
        if parent.info.status == "RUNNING":
            end_pipeline_run(spec, parent_id, "FINISHED")
        return parent_id
    for child in child_runs(tracking.uri, parent_id):
        if child.info.status == "RUNNING":
            end_pipeline_run(spec, child.info.run_id, status)
    if error:
        RunLogger(tracking_uri=tracking.uri, run_id=parent_id).tags({"error": error[:5000]})
    end_pipeline_run(spec, parent_id, status)
    log.info(f"pipeline {spec.name}: MLflow run {parent_id} ended {status}")
    return parent_id


def close_pipeline_run(spec: PipelineSpec, parent_id: str, rows: list[SummaryRow], *, seconds: float) -> None:
    """The pipeline run's summary, wall time and lineage picture; then it is FINISHED."""
    from detkd.tracking.lineage import pipeline_lineage_png
    from detkd.tracking.runs import RunLogger

    parent = RunLogger(tracking_uri=tracking_context(spec).uri, run_id=parent_id)
    parent.dict([row.to_dict() for row in rows], "summary.json")
    parent.metrics({"pipeline_seconds": seconds})
    picture = pipeline_lineage_png(parent.tracking_uri, parent_id, spec.workdir / "lineage.png")
    parent.artifact(picture)
    log.info(f"lineage: {picture} (and on the pipeline's MLflow run)")
    end_pipeline_run(spec, parent_id, "FINISHED")


def run_data_step(spec: PipelineSpec, parent_id: str) -> None:
    """Synthesize the data once (reruns reuse it) and log every split as a child run ``data``."""
    from detkd.pipeline.events import reporting
    from detkd.tracking.runs import RunLogger, run_context

    with reporting("data"):
        if spec.data.synth is None:
            return  # files given: every model run logs the splits it reads
        tracking = tracking_context(spec)
        with run_context(
            tracking_uri=tracking.uri,
            experiment=tracking.experiment,
            run_name="data",
            parent_run_id=parent_id,
            tags={"pipeline": spec.name, "kind": "data", "component": "data", "pipeline_run": parent_id},
        ) as data_id:
            log.info(f"data: synthesizing {spec.data.synth.images} images under {spec.workdir / 'data'}")
            summary = ensure_synthetic_data(spec)
            RunLogger(tracking_uri=tracking.uri, run_id=data_id).dict(summary, "synth_summary.json")
            log_splits(spec, tracking.uri, data_id)


class Evaluation(NamedTuple):
    rows: list[SummaryRow]
    split: str  # the scoring split's name (test when the pipeline has one)
    source: Any  # its DetectionSource
    digest: str  # its dataset digest


def run_evaluate_and_register(spec: PipelineSpec, outcomes: list, parent_id: str) -> list[SummaryRow]:
    """Score every model on the scoring split, then register the chosen student; the summary rows."""
    evaluation = run_evaluate_step(spec, outcomes, parent_id)
    if evaluation is None:
        return []
    if spec.registration is not None:
        outcome_of = {cfg.name: outcome for cfg, outcome in outcomes}
        run_register_step(
            spec,
            evaluation.rows,
            outcome_of,
            evaluation.source,
            evaluation.split,
            evaluation.digest,
            parent_run_id=parent_id,
            configs={cfg.name: cfg for cfg, _ in outcomes},
        )
    return evaluation.rows


def run_evaluate_step(spec: PipelineSpec, outcomes: list, parent_id: str) -> Evaluation | None:
    """Score every model on the scoring split (a child run ``evaluate``); None when the spec has no split to score."""
    from detkd.pipeline.events import reporting

    scoring = data_splits(spec).scoring()
    if scoring is None:
        return None
    with reporting("evaluate"):
        return _evaluate(spec, outcomes, parent_id, scoring)


def _evaluate(spec: PipelineSpec, outcomes: list, parent_id: str, scoring) -> Evaluation:
    from detkd.engine.launch import log_split
    from detkd.engine.plan import open_split
    from detkd.tracking.runs import RunLogger, run_context

    tracking = tracking_context(spec)
    uri = tracking.uri
    split_name, split = scoring
    log.info(f"evaluate: every model on the {split_name} split")
    eval_source = open_split(split, skip_invalid=False)
    rows: list[SummaryRow] = []
    with run_context(
        tracking_uri=uri,
        experiment=tracking.experiment,
        run_name="evaluate",
        parent_run_id=parent_id,
        tags={"pipeline": spec.name, "kind": "evaluate", "component": "evaluate", "pipeline_run": parent_id},
    ) as eval_id:
        eval_logger = RunLogger(tracking_uri=uri, run_id=eval_id)
        split_digest = log_split(uri, eval_id, split_name, split, eval_source)
        eval_logger.tags(
            {f"dataset.{split_name}": split_digest, "evaluated_runs": json.dumps([o.run_id for _, o in outcomes])}
        )
        for cfg, outcome in outcomes:
            row, result = evaluation_row(cfg, outcome, eval_source, batch_size=spec.eval_batch_size, split=split_name)
            rows.append(row)
            eval_logger.metrics(
                {f"{cfg.name}/{split_name}/{k}": v for k, v in result.metrics.items()}
                | {f"{cfg.name}/images_per_s": result.images_per_s}
            )
            if outcome.run_id:
                RunLogger(tracking_uri=uri, run_id=outcome.run_id).metrics(
                    {f"eval/{split_name}/{k}": v for k, v in result.metrics.items()}
                    | {"eval/images_per_s": result.images_per_s}
                )
        eval_logger.dict([row.to_dict() for row in rows], "summary.json")
    return Evaluation(rows, split_name, eval_source, split_digest)


class PipelineFailed(RuntimeError):
    """Steps of a pipeline failed: the message names each, its error, and the steps it stopped."""

    def __init__(self, execution) -> None:
        from detkd.pipeline.events import describe

        self.execution = execution
        lines = [f"step {name} failed: {describe(exc)}" for name, exc in execution.failed.items()]
        if execution.blocked:
            lines.append(f"not run, they need a failed step: {', '.join(execution.blocked)}")
        finished = [name for name in execution.results]
        lines.append(
            f"finished and kept: {', '.join(finished) or 'none'}; fix the cause and run the same command again: "
            "finished steps are reused, not retrained"
        )
        super().__init__("\n".join(lines))


def final_models(spec: PipelineSpec) -> list[str]:
    """The models a pipeline publishes and scores, in spec order (a progressive student once, by its name)."""
    return [e.name for e in spec.teachers + spec.students] + [t.name for t in spec.tune]


def run_model_steps(
    spec: PipelineSpec,
    parent_id: str,
    *,
    address: str | None,
    fresh: bool,
    parallel: int,
    only: list[str] | None = None,
):
    """Train every teacher, student, progressive stage and sweep of the spec's DAG, ``parallel`` at most at once.

    Each step is the same call as before (``run_training``, ``run_stage``, ``run_tune_step``); a
    step starts when the models it learns from are done and the cluster has room. A finished
    step of an earlier run with the same settings is reused, not retrained (``fresh`` retrains).
    Every finished step leaves ``models/<step>/outcome.json``; ``only`` runs just those steps,
    reading what their needs left (``detkd step``, one pipeline component per process).
    """
    import ray

    from detkd.pipeline.dag import build_dag, execute

    dag = build_dag(spec)
    steps = ModelSteps(spec, dag, parent_id, address=address, fresh=fresh, parallel=parallel)
    names = [s.name for s in dag.steps if s.kind in ("teacher", "student", "stage", "tune")]
    if only is not None:
        names = [name for name in names if name in only]
        needed = {n for name in names for n in dag.step(name).needs if n not in names and n != "data"}
        for name in needed:
            steps.results[name] = load_outcome(spec, name)
    try:
        return execute(
            dag, steps.run_and_keep, steps=names, parallel=parallel, fits=steps.fits, on_change=announce,
            results=steps.results,
        )  # fmt: skip
    except KeyboardInterrupt:
        if parallel > 1:  # the steps' threads wait on Ray Train runs: stopping Ray ends them, checkpoints stay
            log.info("interrupted: stopping the running steps; run the same command again to resume them")
            ray.shutdown()
        raise


def announce(step, state: str, error: BaseException | None) -> None:
    """A step's line when it starts, and its state as a pipeline event (``detkd jobs status`` reads them)."""
    from detkd.pipeline.events import describe, emit

    if state == "running":
        log.info(f"{step.kind} {step.name}: {step.detail}")
    emit(step.name, state, error=describe(error) if error is not None else "")


class ModelSteps:
    """How each model step of one pipeline run trains, and how much of the cluster it takes."""

    def __init__(self, spec: PipelineSpec, dag, parent_id: str, *, address: str | None, fresh: bool, parallel: int):
        import ray

        self.spec, self.dag, self.parent_id = spec, dag, parent_id
        self.address, self.fresh, self.parallel = address, fresh, parallel
        self.entries = {e.name: ("teacher", e) for e in spec.teachers} | {e.name: ("student", e) for e in spec.students}
        self.tunes = {t.name: t for t in spec.tune}
        self.total_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.results: dict[str, Any] = {}
        self.tags = {"pipeline": spec.name, "pipeline_run": parent_id}
        self.tracking = tracking_context(spec, parent_run_id=parent_id)

    def config(self, step) -> Config:
        role, entry = self.entries[step.model]
        return model_config(self.spec, entry, role=role)

    def workers(self, step) -> int:
        return 0 if step.kind == "tune" else self.config(step).scaling.num_workers

    def share(self, step) -> float | None:
        """CPUs per worker when steps run side by side: the cluster split over ``parallel`` steps."""
        if self.parallel <= 1:
            return None
        return float(max(1, self.total_cpus // (self.parallel * max(1, self.workers(step)))))

    def fits(self, step, running) -> bool:
        if step.kind == "tune" or any(r.kind == "tune" for r in running):
            return False  # a sweep schedules its own trials over the whole cluster
        demand = sum(self.workers(r) * (self.share(r) or 1) for r in [*running, step])
        return demand <= self.total_cpus

    def run(self, step) -> tuple[Config, TrainOutcome]:
        from detkd.engine.launch import progressive_outcome, run_stage, run_training

        if step.kind == "tune":
            return run_tune_step(self.spec, self.tunes[step.name], parent_run_id=self.parent_id, address=self.address)
        cfg = self.config(step)
        common = {
            "tracking": self.tracking,
            "address": self.address,
            "extra_tags": self.tags,
            "teacher_names": {name: outcome.model_path for name, (_, outcome) in list(self.results.items())},
            "fresh": self.fresh,
            "cpus_per_worker": self.share(step),
            "reuse_finished": True,
        }
        if step.kind != "stage":
            return cfg, run_training(cfg, **common)
        dag, results = self.dag, self.results
        earlier = [s.name for s in dag.steps if s.kind == "stage" and s.model == step.model and s.stage < step.stage]
        outcome = run_stage(cfg, step.stage, previous=results[earlier[-1]][1] if earlier else None, **common)
        if step.stage < step.stages:
            return cfg, outcome
        spent = outcome.seconds + sum(results[name][1].seconds for name in earlier)
        return cfg, progressive_outcome(cfg, outcome, seconds=spent)

    def run_and_keep(self, step) -> tuple[Config, TrainOutcome]:
        cfg, outcome = self.run(step)
        save_outcome(self.spec, step.name, cfg, outcome)
        return cfg, outcome


def outcome_file(spec: PipelineSpec, step: str) -> Path:
    return Path(spec.workdir) / "models" / step / "outcome.json"


def save_outcome(spec: PipelineSpec, step: str, cfg: Config, outcome: TrainOutcome) -> None:
    """What a finished model step returned (its config, checkpoint, MLflow run, metrics), for later steps."""
    from detkd.models.checkpoint import atomic_write_bytes

    data = {"config": cfg.model_dump(mode="json"), "outcome": outcome.to_dict()}
    atomic_write_bytes(outcome_file(spec, step), (json.dumps(data, indent=1, default=str) + "\n").encode())


def load_outcome(spec: PipelineSpec, step: str) -> tuple[Config, TrainOutcome]:
    """(config, TrainOutcome) that a finished step left; a ConfigError naming the file when it has not finished."""
    path = outcome_file(spec, step)
    if not path.is_file():
        raise ConfigError(f"{path}: step {step} has not finished (run it first: detkd step ... {step})")
    data = json.loads(path.read_text())
    return Config.model_validate(data["config"]), TrainOutcome.from_dict(data["outcome"])


def log_splits(spec: PipelineSpec, uri: str, run_id: str) -> None:
    """The data component's lineage: every split it produced, with digests as ``detkd.dataset.<split>`` tags."""
    from detkd.engine.launch import log_split
    from detkd.engine.plan import open_split
    from detkd.tracking.runs import RunLogger

    digests = {}
    for name, split in data_splits(spec)._asdict().items():
        if split is not None:
            digests[f"dataset.{name}"] = log_split(uri, run_id, name, split, open_split(split, skip_invalid=False))
    RunLogger(tracking_uri=uri, run_id=run_id).tags(digests)


def registration_candidates(
    spec: PipelineSpec,
    rows: list[SummaryRow],
    split: str,
    *,
    digest: str = "",
    outcomes: dict[str, TrainOutcome] | None = None,
):
    """(student, baseline or None) of the register section, as the gate reads them from the summary rows.

    With ``outcomes`` each candidate is the trained model (its run and checkpoint), which registering needs;
    without, the rows alone (the gate's verdict only)."""
    from detkd.tracking.registry import Candidate

    row_of = {row.name: row for row in rows}

    def candidate(name: str) -> Candidate:
        row = row_of[name]
        if outcomes is None:
            return Candidate(name, row.mlflow_run_id, Path(), row.AP, split, digest)
        outcome = outcomes[name]
        if outcome.run_id is None:
            raise ConfigError(f"register: {name} has no MLflow run to register from")
        return Candidate(name, outcome.run_id, outcome.model_path, row.AP, split, digest)

    reg = spec.registration
    return candidate(reg.student), candidate(reg.baseline) if reg.baseline else None


def run_register_step(
    spec: PipelineSpec,
    rows: list[SummaryRow],
    outcomes: dict[str, TrainOutcome],
    source,
    split: str,
    digest: str,
    *,
    parent_run_id,
    configs: dict[str, Config],
):
    """Register the chosen student behind the gate (a child run ``register``); its row gets the outcome.

    ``source`` is the scoring split the rows were measured on and ``digest`` its dataset digest;
    ``outcomes`` and ``configs`` are the trained models' (the student's teacher is its speed reference)."""
    from dataclasses import replace

    from detkd.pipeline.events import reporting

    with reporting("register"):
        chosen, baseline = registration_candidates(spec, rows, split, digest=digest, outcomes=outcomes)
        speed, unavailable = deployed_speed(spec, chosen.checkpoint, configs.get(chosen.name), outcomes)
        chosen = replace(chosen, speed=speed, speed_unavailable=unavailable, cost=student_cost(chosen.checkpoint))
        (row,) = [row for row in rows if row.name == chosen.name]
        result = _register(spec, chosen, baseline, source, example_size=row.input_size, parent_run_id=parent_run_id)
        row.registered = registered_label(result)
        if result.existing:
            log.info(f"register: {result.verdict}")
        else:
            log.info(f"register: {result.model} v{result.version} -> {result.alias} ({result.verdict})")
        return result


def speed_reference(
    spec: PipelineSpec, student: Config | None, outcomes: dict[str, TrainOutcome]
) -> tuple[str, Path] | None:
    """(name, checkpoint) of the model the registered student's deployed speed is compared with:
    ``register.gate.speed.reference``, else the student's teacher (its first; a progressive student's
    last stage's), else the pipeline's first teacher; None when there is none."""
    from detkd.engine.teachers import resolve_source

    name = spec.registration.gate.speed.reference or student_teacher(student)
    if name is None and spec.teachers:
        name = spec.teachers[0].name
    if name is None:
        return None
    names = {model: outcome.model_path for model, outcome in outcomes.items()}
    cache = Path(spec.workdir) / "cache" / "references"
    return name, resolve_source(name, names=names, cache_dir=cache, tracking_uri=tracking_context(spec).uri)


def student_teacher(cfg: Config | None) -> str | None:
    """The teacher a student learned from (the source of its first, or its last stage's); None when undistilled."""
    if cfg is None or cfg.distill is None:
        return None
    if cfg.distill.teachers:
        return cfg.distill.teachers[0].source
    return cfg.distill.stages[-1].teacher.source if cfg.distill.stages else None


def deployed_speed(spec: PipelineSpec, checkpoint: Path, student: Config | None, outcomes: dict[str, TrainOutcome]):
    """(SpeedReport, "") of the registered student against its reference on the first images of the scoring
    split, or (None, why) when it cannot be measured (a model ONNX cannot export, no reference)."""
    from detkd.serving.speed import SpeedUnavailable, measure_speed, speed_description, split_images

    settings = spec.registration.gate.speed
    reference = speed_reference(spec, student, outcomes)
    if reference is None:
        why = "no reference: the student has no teacher, the pipeline none, and register.gate.speed.reference is unset"
        log.warning(f"register: deployed speed not measured ({why})")
        return None, why
    name, path = reference
    images = split_images(data_splits(spec).scoring()[1], count=settings.images)
    try:
        report = measure_speed(checkpoint, path, images, settings=settings, reference_name=name)
    except SpeedUnavailable as exc:
        log.warning(f"register: deployed speed not measured ({exc})")
        return None, str(exc)
    log.info(f"register: deployed speed against {name}: {speed_description(report.metrics())}")
    return report, ""


def student_cost(checkpoint: Path):
    """The registered student's MFLOPs and parameters; None (with a warning) when they cannot be counted."""
    from detkd.models.cost import checkpoint_cost

    try:
        return checkpoint_cost(checkpoint)
    except Exception as exc:  # noqa: BLE001 - the cost is recorded for information; registering goes on without it
        log.warning(f"register: could not count the student's cost ({type(exc).__name__}: {exc})")
        return None


def registered_label(result) -> str:
    """A summary row's ``registered``: ``MODEL vN @alias``, marked when the version was already there."""
    label = f"{result.model} v{result.version}" + (f" @{result.alias}" if result.alias else "")
    return f"{label} (already registered)" if result.existing else label


def _register(spec: PipelineSpec, chosen, baseline, source, *, example_size: int, parent_run_id: str):
    """The registry calls under the ``register`` child run, which records what they decided."""
    from detkd.engine.evaluate import evaluate_checkpoint
    from detkd.tracking.registry import logged_model_uri, register_candidate
    from detkd.tracking.runs import RunLogger, run_context

    step, tracking = spec.registration, tracking_context(spec)
    with run_context(
        tracking_uri=tracking.uri,
        experiment=tracking.experiment,
        run_name="register",
        parent_run_id=parent_run_id,
        tags={
            "pipeline": spec.name,
            "kind": "register",
            "component": "register",
            "pipeline_run": parent_run_id,
            "candidate_run": chosen.run_id,
            f"dataset.{chosen.split}": chosen.split_digest,
        },
    ) as register_id:
        model_uri = logged_model_uri(
            tracking.uri, chosen.run_id, checkpoint=chosen.checkpoint, example_size=example_size
        )
        result = register_candidate(
            tracking_uri=tracking.uri,
            model=step.model,
            candidate=chosen,
            baseline=baseline,
            gate=registry_gate(step.gate),
            model_uri=model_uri,
            score_on_split=lambda checkpoint: evaluate_checkpoint(checkpoint, source).metrics["AP"],
            owner=parent_run_id,
            extra_tags={"detkd.pipeline": spec.name, "detkd.pipeline_run": parent_run_id},
        )
        logger = RunLogger(tracking_uri=tracking.uri, run_id=register_id)
        logger.tags(
            {
                "registered_model": result.model,
                "registered_version": result.version,
                "alias": result.alias,
                "verdict": result.verdict,
                "already_registered": str(result.existing).lower(),
            }
        )
        logger.dict({"registration": result.tags, "gate": result.gate.numbers}, "registration.json")
        if chosen.speed is not None:
            logger.metrics({f"speed/{k}": v for k, v in chosen.speed.metrics().items()})
            logger.tags(chosen.speed.tags())
        elif chosen.speed_unavailable:
            logger.tags({"speed.unavailable": chosen.speed_unavailable[:1000]})
        if chosen.cost is not None:
            logger.metrics({f"cost/{k}": v for k, v in chosen.cost.metrics().items()})
    return result


def registry_gate(gate: RegisterGate):
    """The registry's Gate of a spec's ``register.gate`` (its floors; ``speed`` says how speed is measured)."""
    from detkd.tracking.registry import Gate

    return Gate(
        min_gain=gate.min_gain, min_ap=gate.min_ap, min_speedup=gate.min_speedup, max_latency_ms=gate.max_latency_ms
    )


def run_tune_step(spec: PipelineSpec, step: TuneStep, *, parent_run_id: str, address: str | None):
    """Run a pipeline's sweep (a child of its run) and publish the chosen model as the student ``step.name``."""
    from detkd.config import load_config
    from detkd.engine.launch import publish_model
    from detkd.sweeps.space import load_space
    from detkd.sweeps.tuner import SweepOptions, run_sweep

    loaded = load_space(step.space, pipeline=spec)
    options = SweepOptions.from_budget(
        loaded.space.budget,
        samples=step.samples,
        max_concurrent=step.max_concurrent,
        scheduler=step.scheduler,
        search=step.search,
    )
    log.info(f"tune {step.name}: sweep {loaded.name} over {loaded.space.target.student} ({options.samples} samples)")
    sweep = run_sweep(
        loaded, options=options, address=address, tracking=tracking_context(spec, parent_run_id=parent_run_id)
    )
    if sweep.best is None or sweep.best_model is None or sweep.best_config is None:
        raise ConfigError(f"tune {step.name}: sweep {loaded.name} finished without a trial that trained to the end")
    cfg = load_config(sweep.best_config)
    cfg = cfg.model_copy(update={"name": step.name})
    model_path = publish_model(sweep.best_model.parent, spec.workdir.resolve() / "models" / step.name)
    outcome = TrainOutcome(
        name=step.name,
        role="student",
        model_path=model_path,
        run_id=sweep.best.get("mlflow_run_id"),
        metrics={k: v for k, v in sweep.best.items() if k.startswith(("val/", "test/"))},
        method=f"{cfg.method} (tuned)",
    )
    return cfg, outcome


def evaluation_row(cfg: Config, outcome: TrainOutcome, source, *, batch_size: int, split: str):
    """Evaluate a trained model's checkpoint on ``source`` (the ``split``): (SummaryRow, CheckpointEvaluation)."""
    from detkd.engine.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(outcome.model_path, source, batch_size=batch_size, score_thresh=cfg.eval.score_thresh)
    row = SummaryRow.measured(
        name=cfg.name,
        role=cfg.role,
        input_size=result.input_size,
        metrics=result.metrics,
        images_per_s=result.images_per_s,
        run_id=outcome.run_id,
        method=outcome.method,
        split=split,
    )
    return row, result


def write_summary(rows: list[SummaryRow], path: Path) -> None:
    """``summary.json``: the rows as a JSON list (``detkd run/train/evaluate --summary``, a pipeline's workdir)."""
    from detkd.models.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps([row.to_dict() for row in rows], indent=2) + "\n").encode())


def read_summary(path: Path) -> list[SummaryRow]:
    return [SummaryRow.from_dict(row) for row in json.loads(Path(path).read_text())]


SUMMARY_COLUMNS = (
    "name",
    "role",
    "method",
    "input_size",
    "split",
    "AP",
    "AP50",
    "APs",
    "images_per_s",
    "mlflow_run_id",
)


def summary_table(rows: list[SummaryRow]):
    """The rows as the ``detkd run`` table; the registration is its own line (``register: ...``), not a column."""
    from rich.table import Table

    dicts = [row.to_dict() for row in rows]
    columns = [c for c in SUMMARY_COLUMNS if any(c in row for row in dicts)]
    table = Table(title="detkd summary")
    for column in columns:
        table.add_column(
            column,
            justify="left" if column in ("name", "role", "method", "split", "mlflow_run_id") else "right",
        )
    for row in dicts:
        table.add_row(*[f"{row[c]:.4f}" if c in ("AP", "AP50", "APs") else str(row.get(c, "")) for c in columns])
    return table
