"""One step of a pipeline in this process: what ``detkd step`` runs, and so what each Kubeflow component runs.

Steps of one pipeline run may be different processes on different machines; they share the
pipeline's workdir (data, published models, ``models/<step>/outcome.json``, ``summary.json``) and
its MLflow parent run, which the ``data`` step opens and the DAG's last step closes. Each step does
exactly what ``detkd run`` does for it, so both give the same runs, lineage and summary rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from detkd.config import ConfigError
from detkd.pipeline.runner import (
    PipelineFailed,
    close_pipeline_run,
    final_models,
    load_outcome,
    open_pipeline_run,
    read_summary,
    registration_candidates,
    run_data_step,
    run_evaluate_step,
    run_model_steps,
    run_register_step,
    write_summary,
)
from detkd.pipeline.spec import PipelineSpec, data_splits, tracking_context
from detkd.records import SummaryRow

MODEL_KINDS = ("teacher", "student", "stage", "tune")
OUTPUTS_MARKER = "DETKD_STEP_OUTPUTS "  # `detkd step` prints its outputs as one JSON line after this


def summary_file(spec: PipelineSpec) -> Path:
    return Path(spec.workdir) / "summary.json"


def read_rows(spec: PipelineSpec) -> list[SummaryRow]:
    path = summary_file(spec)
    if not path.is_file():
        raise ConfigError(f"{path}: the evaluate step has not run (no summary rows to register from)")
    return read_summary(path)


def run_step(
    spec: PipelineSpec,
    name: str,
    *,
    pipeline_run: str | None = None,
    address: str | None = None,
    fresh: bool = False,
    run_key: str = "",
) -> dict[str, Any]:
    """Run step ``name`` of ``spec``'s DAG; returns its outputs (the pipeline run id, and per kind: the model,
    its MLflow run and metrics; the summary rows and the gate's verdict; the registered version).
    ``run_key`` tags the parent run the data step opens (an orchestrator's id of this pipeline run)."""
    from detkd.pipeline.dag import build_dag
    from detkd.tracking.runs import check_tracking_uri

    spec = spec.model_copy(update={"workdir": spec.workdir.resolve()})
    dag = build_dag(spec)
    if name not in dag.names:
        raise ConfigError(f"{spec.name}: no step named {name!r}; the steps are {', '.join(dag.names)}")
    step = dag.step(name)
    check_tracking_uri(tracking_context(spec).uri)
    if step.kind == "data":
        parent = pipeline_run or open_pipeline_run(spec, run_key=run_key)
        run_data_step(spec, parent)
        outputs: dict[str, Any] = {"pipeline_run": parent, "data": str(spec.workdir / "data")}
    elif not pipeline_run:
        raise ConfigError(f"step {name}: --pipeline-run: the MLflow run id the data step opened (its output)")
    elif step.kind in MODEL_KINDS:
        from detkd.engine.launch import ensure_ray

        ensure_ray(address)
        execution = run_model_steps(spec, pipeline_run, address=address, fresh=fresh, parallel=1, only=[name])
        if not execution.ok:
            raise PipelineFailed(execution)
        _, outcome = execution.results[name]
        outputs = {
            "pipeline_run": pipeline_run,
            "run_id": outcome.run_id,
            "model": str(outcome.model_path),
            "metrics": {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))},
        }
    elif step.kind == "evaluate":
        outcomes = [load_outcome(spec, model) for model in final_models(spec)]
        evaluation = run_evaluate_step(spec, outcomes, pipeline_run)
        write_summary(evaluation.rows, summary_file(spec))
        rows = [row.to_dict() for row in evaluation.rows]
        outputs = {"pipeline_run": pipeline_run, "rows": rows, "gate": gate_verdict(spec, evaluation)}
    else:  # register
        outputs = {"pipeline_run": pipeline_run, **register(spec, pipeline_run)}
    if name == dag.names[-1]:
        rows = read_rows(spec) if summary_file(spec).is_file() else []
        close_pipeline_run(spec, outputs["pipeline_run"], rows, seconds=_seconds_since_start(spec, outputs))
    return outputs


GATE_PASS, GATE_FAIL, GATE_AT_REGISTRATION = "pass", "fail", "speed-at-registration"


def gate_verdict(spec: PipelineSpec, evaluation) -> str:
    """The register section's verdict on the evaluated rows: ``pass``, ``fail``, or ``speed-at-registration``
    when the AP floors pass but the gate has a speed floor (deployed speed is measured by the register step,
    on the machine that registers, and decides there); ``none`` without a register section."""
    from dataclasses import replace

    from detkd.pipeline.runner import registry_gate
    from detkd.tracking.registry import check_gate

    if spec.registration is None:
        return "none"
    student, baseline = registration_candidates(spec, evaluation.rows, evaluation.split)
    gate = registry_gate(spec.registration.gate)
    if not check_gate(student, baseline, replace(gate, min_speedup=None, max_latency_ms=None)).passed:
        return GATE_FAIL
    return GATE_AT_REGISTRATION if gate.speed_floor else GATE_PASS


def register(spec: PipelineSpec, pipeline_run: str) -> dict[str, Any]:
    """The register step in its own process: rows from the evaluate step, the split read again for its digest."""
    from detkd.engine.launch import dataset_records
    from detkd.engine.plan import open_split
    from detkd.tracking.runs import dataset_digest

    rows = read_rows(spec)
    split_name, split = data_splits(spec).scoring()
    source = open_split(split, skip_invalid=False)
    models = {model: load_outcome(spec, model) for model in final_models(spec)}
    outcomes = {model: outcome for model, (_, outcome) in models.items()}
    configs = {model: cfg for model, (cfg, _) in models.items()}
    digest = dataset_digest(dataset_records(source))
    result = run_register_step(
        spec, rows, outcomes, source, split_name, digest, parent_run_id=pipeline_run, configs=configs
    )
    write_summary(rows, summary_file(spec))  # the chosen student's row now names its registered version
    return {
        "model": result.model,
        "version": result.version,
        "alias": result.alias,
        "verdict": result.verdict,
        "existing": result.existing,
    }


def _seconds_since_start(spec: PipelineSpec, outputs: dict[str, Any]) -> float:
    from detkd.tracking.runs import run_start_time

    return max(0.0, time.time() - run_start_time(tracking_context(spec).uri, outputs["pipeline_run"]))
