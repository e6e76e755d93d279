"""``detkd tracking replay``: deliver what a run kept while its tracking server was unreachable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from detkd.cli.common import _fail, _fail_undelivered, _user_errors, app, console, err_console

tracking_app = typer.Typer(no_args_is_help=True, help="MLflow records a run kept while the server was unreachable.")
app.add_typer(tracking_app, name="tracking")


@tracking_app.command("replay")
def replay_command(
    run_folder: Annotated[
        Path, typer.Argument(help="the run's output folder (run.output_dir/<name>), or its tracking-outbox folder")
    ],
    tracking_uri: Annotated[
        str | None, typer.Option(help="deliver to this server instead of the one the run logged to")
    ] = None,
) -> None:
    """Deliver RUN_FOLDER/tracking-outbox to its MLflow run, in order; remove it once everything arrived.

    Safe to run again: each delivery is counted in the folder, so an interrupted replay continues where it
    stopped. A server that still does not answer: exit code 1, the outbox unchanged."""
    from detkd.tracking.delivery import TrackingNotDelivered, replay

    try:
        done = replay(run_folder, tracking_uri=tracking_uri)
    except _user_errors() as exc:
        _fail(exc)
    except TrackingNotDelivered as exc:
        _fail_undelivered(exc)
    console.print(
        f"delivered {done.delivered} to run {', '.join(done.run_ids)} at {done.tracking_uri}", highlight=False
    )
    if done.refused:
        for refused in done.refused:
            err_console.print(f"[red]error:[/red] the tracking store refused {refused}", highlight=False)
        raise typer.Exit(1)
