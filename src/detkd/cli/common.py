"""What every ``detkd`` command shares: the app, the consoles, the log handler, and how errors end."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train teacher detectors and distill them into small low-resolution students (Ray + MLflow).",
)
data_app = typer.Typer(no_args_is_help=True, help="Synthesize, check and convert datasets.")
app.add_typer(data_app, name="data")
# A wide console when piped (CI logs, files) so the summary table keeps its run ids.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


class ConsoleHandler(logging.Handler):
    """The library's log records as users read them: plain lines on stdout, warnings plain on stderr,
    errors as ``error:`` lines (the consoles' streams are looked up per write, so CliRunner captures them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)
            return
        renderable = getattr(record, "renderable", None)  # a table logged with its text (the sweep's)
        if renderable is not None and record.levelno < logging.WARNING:
            console.print(renderable)
        elif record.levelno >= logging.ERROR:
            for line in message.splitlines() or [""]:
                err_console.print("[red]error:[/red] ", end="", highlight=False)
                err_console.print(line, highlight=False, markup=False, soft_wrap=True)
        else:
            target = err_console if record.levelno >= logging.WARNING else console
            target.print(message, highlight=False, markup=False, soft_wrap=True)


def install_log_handler() -> None:
    """One handler on the ``detkd`` logger, INFO and up; idempotent (every command calls it)."""
    logger = logging.getLogger("detkd")
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(ConsoleHandler())
    logger.setLevel(logging.INFO)


@app.callback()
def _setup() -> None:
    install_log_handler()


SetOption = Annotated[list[str] | None, typer.Option("--set", help="dotted override, e.g. input.scale=0.5")]
RayAddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join, HOST:6379 or ray://HOST:10001 (default: RAY_ADDRESS, else a local Ray)"),
]
FreshOption = Annotated[
    bool, typer.Option("--fresh", help="start over: discard this run's checkpoints instead of resuming them")
]


def _user_errors() -> tuple[type[BaseException], ...]:
    from detkd.config import ConfigError
    from detkd.data.records import DatasetError
    from detkd.engine.coco_eval import EvaluationError
    from detkd.models.checkpoint import CheckpointError

    return ConfigError, DatasetError, EvaluationError, CheckpointError, FileNotFoundError


def _print_errors(exc: BaseException) -> None:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        err_console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)  # e.g. '.[kfp]'


def _fail(exc: BaseException) -> None:
    _print_errors(exc)
    raise typer.Exit(2)


def _fail_undelivered(exc: BaseException) -> None:
    """The training finished and kept its work, but tracking records did not reach the server
    (``TrackingNotDelivered``): its one line, exit code 1."""
    _print_errors(exc)
    raise typer.Exit(1)


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    """A run that stopped on an OS error no retry can fix (a full disk, a read-only filesystem, a denied
    permission, a quota; see ``detkd.oserrors``) ends in one ``error:`` line naming the path and the errno's
    meaning, exit code 1. Any other error passes through unchanged."""
    from detkd.oserrors import permanent_os_error
    from detkd.pipeline.runner import PipelineFailed

    try:
        yield
    except (typer.Exit, PipelineFailed):  # a failed pipeline says which step stopped: _fail_pipeline
        raise
    except Exception as exc:
        stop = permanent_os_error(exc)
        if stop is None:
            raise
        _print_errors(stop)
        raise typer.Exit(1) from None


def _fail_pipeline(exc: BaseException, *, tracebacks: bool = True) -> None:
    """A pipeline with failed steps (``PipelineFailed``): with ``tracebacks``, each step that crashed (a bug, not
    a user error) with its traceback; then the summary as ``error:`` lines, exit code 1. A step stopped by a
    permanent OS error (a full disk) gives the one ``error:`` line, the summary follows as plain lines."""
    from detkd.oserrors import permanent_os_error

    stops = {name: stop for name, error in exc.execution.failed.items() if (stop := permanent_os_error(error))}
    if stops:
        name, stop = next(iter(stops.items()))
        _print_errors(RuntimeError(f"step {name}: {stop}"))
        for line in str(exc).splitlines():
            err_console.print(line, highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if tracebacks:
        import traceback

        from detkd.tracking.delivery import TrackingNotDelivered

        for name, error in exc.execution.failed.items():
            if not isinstance(error, (*_user_errors(), TrackingNotDelivered)):
                err_console.print(f"step {name}:", highlight=False)
                err_console.print("".join(traceback.format_exception(error)), highlight=False, markup=False)
    _print_errors(exc)
    raise typer.Exit(1) from None


def _local_model(ref: str | Path) -> Path:
    """A checkpoint path, or the checkpoint of a registered ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``
    (downloaded once per version into ~/.cache/detkd/models, or $DETKD_CACHE/models)."""
    text = str(ref)
    if not text.startswith("models:/"):
        return Path(text)
    import os

    from detkd.tracking.registry import registered_checkpoint
    from detkd.tracking.runs import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(None)
    check_tracking_uri(uri)
    cache = Path(os.environ.get("DETKD_CACHE", Path.home() / ".cache" / "detkd")) / "models"
    path, pinned = registered_checkpoint(text, tracking_uri=uri, cache_dir=cache)
    err_console.print(f"{text}: {pinned}", highlight=False)
    return path
