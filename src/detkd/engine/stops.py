"""Worker errors that a restart would meet again end a Ray Train run at once, with one message.

Ray Train's failure policy restarts the workers after any error (``run.max_failures``). That is right for a
lost node, wrong for a full disk (retrying cannot free it), a corrupt image (the next attempt reads it
again) or a checkpoint that does not fit the model. Ray 2.60 has no public custom failure policy; its
public ``UserCallback.after_exception`` runs in the Train controller after each poll that found worker
errors and before the policy decides. :class:`StopOnUnfixable` raises a ``ControllerError`` there for such
an error, which the default policy never retries; the driver takes the original error back out of it
(:func:`unfixable` again). The tracebacks Ray would log for these handled errors (the worker's "Error in
training function", the policy's decision) are dropped by :class:`HandledErrorFilter`; every other error
is logged as before.
"""

from __future__ import annotations

import logging
from typing import Any

import ray.train

from detkd.data.records import DatasetError
from detkd.engine.checkpoints import CheckpointMismatch
from detkd.oserrors import PermanentOSError, linked, permanent_os_error

HANDLED = (PermanentOSError, DatasetError, CheckpointMismatch)

# Ray Train's loggers that print a handled error's traceback (worker process, controller process)
WORKER_ERROR_LOGGER = "ray.train.v2._internal.util"  # "Error in training function:\n<traceback>"
POLICY_LOGGER = "ray.train.v2._internal.execution.failure_handling.default"  # "[FailurePolicy] RAISE ..."


def unfixable(error: BaseException, *, database: str | None = None) -> BaseException | None:
    """The error a restart would meet again that ``error`` is or carries: a permanent OS error, a dataset
    error, a checkpoint that does not fit; None for anything else (a lost worker, a bug)."""
    found = permanent_os_error(error, database=database)
    if found is not None:
        return found
    return next((e for e in linked(error) if isinstance(e, (DatasetError, CheckpointMismatch))), None)


class HandledErrorFilter(logging.Filter):
    """Drops the log records of Ray Train that only repeat, as a traceback, an error detkd reports itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            return not isinstance(getattr(error, "controller_failure", None), HANDLED)
        raised = final_exception_line(record.getMessage())
        return not any(raised.startswith(f"{t.__module__}.{t.__qualname__}:") for t in HANDLED)


def final_exception_line(text: str) -> str:
    """In a formatted traceback, the line naming the exception finally raised (chained ones come before it)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return ""
    return next((line for line in lines[starts[-1] + 1 :] if line and not line[0].isspace()), "")


def quiet_handled_errors(logger_name: str) -> None:
    """Install :class:`HandledErrorFilter` on one of Ray Train's loggers in this process (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, HandledErrorFilter) for f in logger.filters):
        logger.addFilter(HandledErrorFilter())


class StopOnUnfixable(ray.train.UserCallback):
    """Ray Train callback (runs in the controller): a worker error :func:`unfixable` recognises ends the run
    without a restart. ``database``: the run's SQLite tracking file, named in a "database or disk is full"."""

    def __init__(self, *, database: str | None = None) -> None:
        self.database = database

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            cause = unfixable(error, database=self.database)
            if cause is not None:
                quiet_handled_errors(POLICY_LOGGER)
                # a TrainingFailedError is not wrapped again (nor logged as unexpected) by the controller
                raise ray.train.ControllerError(cause)
