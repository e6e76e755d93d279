"""The pipeline commands: ``detkd run``, ``plan``, ``compile``, ``step``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from detkd.cli.common import (
    FreshOption,
    RayAddressOption,
    SetOption,
    _fail,
    _fail_pipeline,
    _os_errors,
    _user_errors,
    app,
    console,
)


@app.command("run")
def run(
    pipeline: Annotated[Path, typer.Argument(help="pipeline spec YAML")],
    overrides: SetOption = None,
    summary: Annotated[Path | None, typer.Option(help="write the summary rows as JSON here")] = None,
    address: RayAddressOption = None,
    fresh: FreshOption = False,
    parallel: Annotated[
        int,
        typer.Option(
            min=1, help="train up to N independent steps at once when the cluster has room (default: one at a time)"
        ),
    ] = 1,
) -> None:
    """Run a pipeline spec: data -> teachers -> students -> evaluation (see `detkd plan` for its steps)."""
    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import PipelineFailed, run_pipeline, summary_table, write_summary

    try:
        spec = load_pipeline(pipeline, overrides or [])
        with _os_errors():
            rows = run_pipeline(spec, address=address, fresh=fresh, parallel=parallel)
    except _user_errors() as exc:
        _fail(exc)
    except PipelineFailed as exc:
        _fail_pipeline(exc)  # a step that crashed (a bug) shows its traceback, not only its message
    console.print(summary_table(rows))
    if summary:
        write_summary(rows, summary)
        console.print(f"summary: {summary}")


@app.command("plan")
def plan(
    pipeline: Annotated[Path, typer.Argument(help="pipeline spec YAML")],
    overrides: SetOption = None,
    png: Annotated[Path | None, typer.Option(help="where to draw the DAG (default: <workdir>/plan.png)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the steps as JSON instead of text")] = False,
) -> None:
    """Show a pipeline's steps, what each needs and which can run together (text and a PNG); trains nothing."""
    from detkd.pipeline.dag import build_dag, dag_png, format_dag
    from detkd.pipeline.load import load_pipeline

    try:
        spec = load_pipeline(pipeline, overrides or [])
        dag = build_dag(spec)
    except _user_errors() as exc:
        _fail(exc)
    picture = dag_png(dag, png or spec.workdir / "plan.png")
    if as_json:
        print(json.dumps(dag.to_dict() | {"png": str(picture)}, indent=2))
        return
    console.print(format_dag(dag), highlight=False, markup=False)
    console.print(f"picture: {picture}", highlight=False)


@app.command("compile")
def compile_command(
    pipeline: Annotated[Path, typer.Argument(help="pipeline spec YAML")],
    out: Annotated[Path, typer.Option(help="the KFP pipeline (IR YAML) to write")],
    overrides: SetOption = None,
    spec_path: Annotated[
        str | None, typer.Option(help="the spec's path as the tasks see it (default: PIPELINE as given)")
    ] = None,
    ray_address: Annotated[
        str, typer.Option(help="Ray dashboard the model steps submit their training to (default: in their pod)")
    ] = "",
) -> None:
    """Compile a pipeline spec into a Kubeflow Pipelines v2 pipeline whose tasks are its steps (needs the kfp extra)."""
    from detkd.extras import require
    from detkd.pipeline.dag import build_dag
    from detkd.pipeline.load import load_pipeline

    try:
        require("kfp", why="detkd compile")  # before kfp is imported: one error line, not a traceback
        from detkd.cluster.kubeflow import compile_pipeline

        dag = build_dag(load_pipeline(pipeline, overrides or []))
        written = compile_pipeline(
            dag, out, spec=spec_path or str(pipeline), overrides=list(overrides or []), ray_address=ray_address
        )
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"compiled {len(dag.steps)} steps of {dag.pipeline} into {written}", highlight=False)


@app.command("step")
def step_command(
    pipeline: Annotated[Path, typer.Argument(help="pipeline spec YAML")],
    step: Annotated[str, typer.Argument(help="the step to run (see `detkd plan`)")],
    overrides: SetOption = None,
    pipeline_run: Annotated[
        str | None, typer.Option(help="the pipeline's MLflow run (the data step's output; it opens one without)")
    ] = None,
    outputs: Annotated[Path | None, typer.Option(help="also write the step's outputs here as JSON")] = None,
    run_key: Annotated[
        str, typer.Option(help="data step: tag the pipeline's MLflow run with this id (a Kubeflow run's id)")
    ] = "",
    address: RayAddressOption = None,
    fresh: FreshOption = False,
) -> None:
    """Run one step of a pipeline (what each Kubeflow component runs); the steps it needs must have finished."""
    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import PipelineFailed
    from detkd.pipeline.step import run_step

    try:
        spec = load_pipeline(pipeline, overrides or [])
        with _os_errors():
            result = run_step(spec, step, pipeline_run=pipeline_run, address=address, fresh=fresh, run_key=run_key)
    except _user_errors() as exc:
        _fail(exc)
    except PipelineFailed as exc:
        _fail_pipeline(exc, tracebacks=False)
    from detkd.pipeline.step import OUTPUTS_MARKER

    text = json.dumps(result, default=str)
    if outputs:
        outputs.parent.mkdir(parents=True, exist_ok=True)
        outputs.write_text(text + "\n")
    print(f"{OUTPUTS_MARKER}{text}", flush=True)  # one line a caller (a Kubeflow component) can find
