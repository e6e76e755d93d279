"""The ``detkd`` command. User mistakes end in one clear line per problem and exit code 2.

One module per command group; importing them registers their commands on ``app``, in the order
``detkd --help`` lists them.
"""

from __future__ import annotations

import signal
import sys

from detkd.cli.common import app, console, err_console, install_log_handler

# importing a module registers its commands, in this order
# isort: off
from detkd.cli import data, models, pipeline, tune, jobs  # noqa: F401
# isort: on

__all__ = ["app", "console", "err_console", "install_log_handler", "main"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster preempting the pod, ``kill``): stops the command as Ctrl-C does, so the MLflow run is
    marked KILLED, Ray Train's run ends, checkpoints stay, and the local Ray this process started is shut down."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except Terminated:
        err_console.print(
            "terminated (SIGTERM): the checkpoints are kept; run the same command again to resume from the last one"
        )
        sys.exit(143)
    except KeyboardInterrupt:
        err_console.print("interrupted: rerun the same command to resume from the last checkpoint")
        sys.exit(130)
