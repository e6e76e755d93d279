"""The ``detkd`` command. User mistakes end in one clear line per problem and exit code 2.

One module per command group; importing them registers their commands on ``app``, in the order
``detkd --help`` lists them.
"""

from __future__ import annotations

import sys

from detkd.cli.common import app, console, err_console, install_log_handler

# importing a module registers its commands, in this order
# isort: off
from detkd.cli import data, models, pipeline, tune, jobs, tracking  # noqa: F401
# isort: on

__all__ = ["app", "console", "err_console", "install_log_handler", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted: rerun the same command to resume from the last checkpoint")
        sys.exit(130)
