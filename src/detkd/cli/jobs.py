"""Ray cluster commands: ``detkd submit`` and ``detkd jobs``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from detkd.cli.common import SetOption, _fail, _user_errors, app, console

jobs_app = typer.Typer(no_args_is_help=True, help="Inspect and control jobs on a Ray cluster.")
app.add_typer(jobs_app, name="jobs")
AddressOption = Annotated[str, typer.Option(envvar="RAY_JOBS_ADDRESS", help="Ray dashboard, e.g. http://HOST:8265")]


@app.command("submit")
def submit(
    spec: Annotated[Path, typer.Argument(help="pipeline spec or run config inside this project")],
    address: AddressOption,
    overrides: SetOption = None,
    follow: Annotated[bool, typer.Option(help="stream the logs; exit non-zero if the job fails")] = False,
    env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE environment for the job")] = None,
    parallel: Annotated[
        int | None, typer.Option(min=1, help="pipelines: train up to N independent steps at once on the cluster")
    ] = None,
    step: Annotated[str | None, typer.Option(help="pipelines: run only this step there (`detkd step`)")] = None,
    pipeline_run: Annotated[str | None, typer.Option(help="with --step: the pipeline's MLflow run")] = None,
) -> None:
    """Submit a pipeline or a run to a Ray cluster (Ray Jobs API)."""
    from detkd.cluster import jobs

    try:
        extra = dict(item.split("=", 1) for item in env or [] if "=" in item)
        if env and len(extra) != len(env):
            raise FileNotFoundError("--env takes KEY=VALUE")
        root = jobs.find_project_root(spec.parent if spec.exists() else Path.cwd())
        job_id = jobs.submit(
            spec,
            address=address,
            project_root=root,
            overrides=overrides or [],
            extra_env=extra,
            parallel=parallel,
            step=step,
            pipeline_run=pipeline_run,
        )
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"submitted job [bold]{job_id}[/bold] to {address}")
    print(job_id, flush=True)
    if follow:
        status = jobs.follow(job_id, address=address)
        console.print(f"job {job_id}: {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(address: AddressOption) -> None:
    """Jobs on the cluster, newest last; a pipeline's steps as ``finished/all``."""
    from rich.table import Table

    from detkd.cluster import jobs
    from detkd.pipeline.events import summary

    try:
        found = jobs.client(address).list_jobs()
    except _user_errors() as exc:
        _fail(exc)
    table = Table()
    for column in ("submission_id", "status", "steps", "entrypoint"):
        table.add_column(column)
    for job in sorted(found, key=lambda j: j.start_time or 0):
        steps = jobs.steps_of(job, address=address) if job.submission_id else None
        table.add_row(str(job.submission_id), str(job.status.value), summary(steps) if steps else "", job.entrypoint)
    console.print(table)


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOption) -> None:
    """One job's status, and each step's state for a pipeline; exit 1 if it failed or was stopped."""
    from detkd.cluster import jobs

    try:
        info = jobs.client(address).get_job_info(job_id)
        steps = jobs.steps_of(info, address=address)
    except _user_errors() as exc:
        _fail(exc)
    status = str(info.status.value)
    console.print(status)
    if steps is not None:
        console.print(_steps_table(steps))
    if status in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


def _steps_table(states):
    from rich.table import Table

    table = Table()
    for column in ("step", "state", "seconds", "error"):
        table.add_column(column)
    for state in states:
        seconds = f"{state.seconds:.1f}" if state.seconds is not None else ""
        table.add_row(state.step, state.state, seconds, state.error)
    return table


@jobs_app.command("logs")
def jobs_logs(
    job_id: str, address: AddressOption, follow: Annotated[bool, typer.Option(help="stream until the job ends")] = False
) -> None:
    """A job's logs."""
    from detkd.cluster import jobs

    if follow:
        status = jobs.follow(job_id, address=address)
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)
    sys.stdout.write(jobs.client(address).get_job_logs(job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOption) -> None:
    """Ask a running job to stop."""
    from detkd.cluster import jobs

    stopped = jobs.client(address).stop_job(job_id)
    console.print(f"job {job_id}: {'stop requested' if stopped else 'not running'}")
