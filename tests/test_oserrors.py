"""Permanent OS errors in the shapes they reach detkd, mapped to the one error a run ends on; and SIGTERM."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest

from detkd.models.checkpoint import atomic_write_bytes
from detkd.oserrors import (
    PermanentOSError,
    QuietPermanentOSErrors,
    as_permanent,
    permanent_os_error,
)
from detkd.signals import Terminated, sigterm_received, terminate_on_sigterm


def test_the_message_names_the_path_the_errno_and_what_to_do():
    stop = PermanentOSError(errno.ENOSPC, "/x/ray/run/checkpoint_3").with_note("training stopped at step 80 of 120")
    stop = stop.with_note("checkpoint_2 (step 60) is kept")
    assert str(stop) == (
        "no space left on device (ENOSPC) writing /x/ray/run/checkpoint_3: training stopped at step 80 of 120; "
        "checkpoint_2 (step 60) is kept; free space and run the same command again to resume"
    )
    assert str(pickle.loads(pickle.dumps(stop))) == str(stop)  # it crosses Ray's process boundaries whole
    assert str(PermanentOSError(errno.EROFS, "/data")).startswith("read-only file system (EROFS) writing /data; make")
    assert "quota exceeded (EDQUOT)" in str(PermanentOSError(errno.EDQUOT, "/q"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT])
def test_each_permanent_errno_is_mapped_with_its_path(code):
    stop = as_permanent(OSError(code, os.strerror(code), "/some/file"))
    assert stop is not None and stop.errno == code and stop.path == "/some/file"
    assert f"({errno.errorcode[code]})" in str(stop)


def test_other_os_errors_are_not_permanent():
    assert as_permanent(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None
    assert as_permanent(OSError("image file is truncated (3 bytes not processed)")) is None  # PIL's: no errno
    assert as_permanent(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None


def test_a_copy_that_fails_names_its_target(tmp_path):
    """shutil names both files of a failed copy: the full one is the second."""
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a"), None, str(tmp_path / "b"))
    assert as_permanent(error).path == str(tmp_path / "b")
    denied = PermissionError(errno.EACCES, "Permission denied", "/src", None, "/dst")
    assert as_permanent(denied).path == "/src" and "accessing /src" in str(as_permanent(denied))


def test_a_write_on_a_full_disk_names_its_file_and_leaves_nothing_behind(tmp_path):
    """A real ENOSPC (a 64 KB tmpfs): the failed write named no file; detkd's atomic writer names its target."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        with pytest.raises(OSError) as caught:
            atomic_write_bytes(small / "train_state.pt", b"x" * 500_000)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(small / "train_state.pt")
        assert list(small.iterdir()) == []  # the temp file is gone, no half-written target
        assert as_permanent(caught.value).path == str(small / "train_state.pt")
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_sqlite_full_and_readonly_databases_are_permanent_and_named(tmp_path):
    database = tmp_path / "mlflow.db"
    sqlite3.connect(database).execute("create table t (x)").connection.commit()
    readonly = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as caught:
        readonly.execute("insert into t values (1)")
    stop = permanent_os_error(caught.value, database=str(database))
    assert stop is not None and stop.errno == errno.EROFS and stop.path == str(database)
    full = RuntimeError("(sqlite3.OperationalError) database or disk is full [SQL: UPDATE runs ...]")  # as MLflow's
    assert permanent_os_error(full).errno == errno.ENOSPC
    assert permanent_os_error(full).path == "the MLflow tracking database"


def test_the_error_detkd_raised_wins_over_one_raised_while_the_run_was_ending():
    """On a full disk, marking the MLflow run FAILED fails too: the first error, which knows where training
    stopped, is the one reported."""
    ours = PermanentOSError(errno.ENOSPC, "/ray/checkpoint_3", notes=("training stopped at step 6 of 8",))
    try:
        try:
            raise ours
        except PermanentOSError:
            raise RuntimeError("database or disk is full") from None
    except RuntimeError as later:
        assert later.__suppress_context__ and later.__context__ is ours
        assert permanent_os_error(later) is ours


def test_errors_wrapped_by_ray_train_and_a_pipeline_are_found():
    import ray.train

    from detkd.pipeline.dag import Execution
    from detkd.pipeline.runner import PipelineFailed

    raw = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    wrapped = ray.train.WorkerGroupError("rank 0 failed", {0: raw})
    assert permanent_os_error(wrapped).errno == errno.ENOSPC
    assert permanent_os_error(ray.train.ControllerError(PermanentOSError(errno.EROFS, "/r"))).path == "/r"
    failed = PipelineFailed(Execution(failed={"teacher": PermanentOSError(errno.ENOSPC, "/w")}))
    assert permanent_os_error(failed).path == "/w"
    assert permanent_os_error(ValueError("bad config")) is None


def test_library_logs_of_a_permanent_error_are_dropped_others_kept():
    quiet = QuietPermanentOSErrors()

    def record(message: str, error: BaseException | None = None) -> logging.LogRecord:
        info = (type(error), error, None) if error else None
        return logging.LogRecord("mlflow.store.db.utils", logging.ERROR, __file__, 1, message, (), info)

    assert not quiet.filter(record("SQLAlchemy database error", RuntimeError("database or disk is full")))
    assert not quiet.filter(record("(sqlite3.OperationalError) database or disk is full"))
    assert quiet.filter(record("SQLAlchemy database error", RuntimeError("no such table: runs")))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_raises_terminated_in_the_main_thread():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        terminate_on_sigterm()
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                shutil.disk_usage("/")
        assert sigterm_received() and isinstance(Terminated(), KeyboardInterrupt)
    finally:
        signal.signal(signal.SIGTERM, previous)
