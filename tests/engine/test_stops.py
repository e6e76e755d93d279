"""What ends a Ray Train run at once instead of being retried, and the Ray log lines that only repeat it."""

from __future__ import annotations

import errno
import logging

import pytest
import ray.train

from detkd.data.records import DatasetError, Problem
from detkd.engine.checkpoints import CheckpointMismatch
from detkd.engine.stops import HandledErrorFilter, StopOnUnfixable, unfixable
from detkd.oserrors import PermanentOSError

CORRUPT = DatasetError([Problem("/d/images/a.png", "image id=3 (a.png)", "cannot decode image: truncated")])


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"),
        PermanentOSError(errno.EDQUOT, "/q/checkpoint_4"),
        RuntimeError("(sqlite3.OperationalError) database or disk is full"),
        CORRUPT,
        CheckpointMismatch("does not fit"),
    ],
)
def test_errors_a_restart_would_meet_again_end_the_run_without_retries(error):
    callback = StopOnUnfixable(database="/w/mlflow.db")
    with pytest.raises(ray.train.ControllerError) as caught:  # the default failure policy never retries it
        callback.after_exception(run_context=None, worker_exceptions={1: RuntimeError("collateral"), 0: error})
    cause = caught.value.controller_failure
    assert isinstance(cause, (PermanentOSError, DatasetError, CheckpointMismatch))
    assert unfixable(caught.value) is not None  # the driver takes it back out


@pytest.mark.parametrize(
    "error", [RuntimeError("worker died"), FileNotFoundError(errno.ENOENT, "gone"), OSError("image file is truncated")]
)
def test_other_worker_errors_are_left_to_the_failure_policy(error):
    StopOnUnfixable().after_exception(run_context=None, worker_exceptions={0: error})
    assert unfixable(error) is None


def _record(message: str, error: BaseException | None = None) -> logging.LogRecord:
    info = (type(error), error, None) if error is not None else None
    return logging.LogRecord("ray.train", logging.ERROR, __file__, 1, message, (), info)


def test_only_the_tracebacks_of_handled_errors_are_dropped():
    keep = HandledErrorFilter().filter
    head = "Error in training function:\nTraceback (most recent call last):\n  File x\n"
    assert not keep(_record(head + "detkd.oserrors.PermanentOSError: no space left on device"))
    assert not keep(_record(head + "detkd.data.records.DatasetError: /d: bad\n/d: worse"))
    assert keep(_record(head + "ZeroDivisionError: division by zero"))
    # a bug raised while handling one of them is not handled: its traceback stays
    chained = (
        head + "detkd.data.records.DatasetError: /d: bad\n\nDuring handling of the above exception, another "
        "exception occurred:\n\nTraceback (most recent call last):\n  File y\nNameError: name 'z' is not defined"
    )
    assert keep(_record(chained))
    assert not keep(_record("[FailurePolicy] RAISE", ray.train.ControllerError(CORRUPT)))
    assert keep(_record("[FailurePolicy] RETRY", ray.train.ControllerError(RuntimeError("startup"))))
