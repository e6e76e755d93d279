"""The ``detkd`` command. User mistakes end in one clear line per problem and exit code 2.

One module per command group; importing them registers their commands on ``app``, in the order
``detkd --help`` lists them.
"""

from __future__ import annotations

import sys

from detkd.cli.common import app, console, err_console, install_log_handler
from detkd.signals import Terminated, sigterm_received, terminate_on_sigterm

# importing a module registers its commands, in this order
# isort: off
from detkd.cli import data, models, pipeline, tune, jobs, tracking  # noqa: F401
# isort: on

__all__ = ["app", "console", "err_console", "install_log_handler", "main"]


def main() -> None:
    terminate_on_sigterm()  # SIGTERM stops the command as Ctrl-C does (detkd/signals.py)
    try:
        app()
    except SystemExit as exc:  # typer ends an interrupted command with exit code 130
        if exc.code == 130 and sigterm_received():
            _terminated()
        raise
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated) or sigterm_received():
            _terminated()
        err_console.print("interrupted: rerun the same command to resume from the last checkpoint")
        sys.exit(130)


def _terminated() -> None:
    err_console.print(
        "terminated (SIGTERM): the checkpoints are kept; run the same command again to resume from the last one"
    )
    sys.exit(143)
