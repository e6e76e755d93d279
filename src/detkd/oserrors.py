"""OS errors that no retry can fix (a full disk, a read-only filesystem, a denied permission, a quota), and
the one error that ends a run on them: it names the path and the errno's meaning, the CLI exits 1.

Such an error reaches detkd in many shapes: an ``OSError`` from a write, pyarrow's copy of a checkpoint
(``OSError`` without a file name), SQLite under MLflow (``MlflowException`` / SQLAlchemy's
``OperationalError`` saying "database or disk is full"), or wrapped by Ray Train and by later errors raised
while the run was ending. :func:`permanent_os_error` finds it in any of them.
"""

from __future__ import annotations

import errno as errnos
import logging
import os
from collections.abc import Iterator

PERMANENT_ERRNOS = frozenset({errnos.ENOSPC, errnos.EROFS, errnos.EACCES, errnos.EPERM, errnos.EDQUOT})
WRITE_ERRNOS = frozenset({errnos.ENOSPC, errnos.EROFS, errnos.EDQUOT})  # only a write meets these
# SQLite's messages for the same faults (they reach MLflow's callers as text, without an errno)
SQLITE_MESSAGES = {"database or disk is full": errnos.ENOSPC, "attempt to write a readonly database": errnos.EROFS}
ADVICE = {
    errnos.ENOSPC: "free space and run the same command again to resume",
    errnos.EDQUOT: "free space (or raise the quota) and run the same command again to resume",
    errnos.EROFS: "make it writable and run the same command again to resume",
    errnos.EACCES: "fix its permissions and run the same command again to resume",
    errnos.EPERM: "fix its permissions and run the same command again to resume",
}


class PermanentOSError(RuntimeError):
    """A run stopped on an OS error that retrying cannot fix (exit code 1: nothing is wrong with the input).

    ``notes`` say what was kept and where training stopped; the message ends with what to do."""

    def __init__(self, code: int, path: str | None, *, action: str = "writing", notes: tuple[str, ...] = ()) -> None:
        self.errno, self.path, self.action, self.notes = code, path, action, tuple(notes)
        super().__init__(str(self))

    @property
    def meaning(self) -> str:
        """``no space left on device (ENOSPC)``."""
        text = os.strerror(self.errno)
        return f"{text[:1].lower()}{text[1:]} ({errnos.errorcode.get(self.errno, self.errno)})"

    def with_note(self, note: str) -> PermanentOSError:
        return PermanentOSError(self.errno, self.path, action=self.action, notes=(*self.notes, note))

    def __str__(self) -> str:
        head = self.meaning + (f" {self.action} {self.path}" if self.path else "")
        if self.notes:
            head += f": {self.notes[0]}"
        advice = ADVICE.get(self.errno, "fix the cause and run the same command again to resume")
        return "; ".join([head, *self.notes[1:], advice])

    def __reduce__(self):  # crosses process boundaries (Ray workers, the Train controller)
        return (_rebuild, (self.errno, self.path, self.action, self.notes))


def _rebuild(code: int, path: str | None, action: str, notes: tuple[str, ...]) -> PermanentOSError:
    return PermanentOSError(code, path, action=action, notes=notes)


def linked(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every error it carries: causes, contexts, and what Ray Train and the pipeline runner wrap
    (a controller's failure, each worker's, a failed pipeline's steps), breadth first, each once."""
    queue, seen = [error], set()
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue += [current.__cause__, current.__context__]
        queue += [getattr(current, name, None) for name in ("controller_failure", "_base_exc", "cause")]
        queue += list((getattr(current, "worker_failures", None) or {}).values())
        execution = getattr(current, "execution", None)  # detkd.pipeline.runner.PipelineFailed
        queue += list((getattr(execution, "failed", None) or {}).values())


def as_permanent(error: BaseException, *, database: str | None = None) -> PermanentOSError | None:
    """``error`` itself as a :class:`PermanentOSError` when it is one (None otherwise). ``database`` names the
    SQLite file an SQLite message is about."""
    if isinstance(error, PermanentOSError):
        return error
    if isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS:
        # a write's target is the second name of a two-path call (shutil.copyfile(src, dst))
        first, second = error.filename, error.filename2
        path = (second or first) if error.errno in WRITE_ERRNOS else (first or second)
        return PermanentOSError(
            error.errno,
            None if path is None else os.fsdecode(path),
            action="writing" if error.errno in WRITE_ERRNOS else "accessing",
        )
    if isinstance(error, OSError):
        return None  # e.g. PIL's "image file is truncated" (no errno): a data error, not this
    text = str(error)
    for message, code in SQLITE_MESSAGES.items():
        if message in text:
            return PermanentOSError(code, database or "the MLflow tracking database")
    return None


def permanent_os_error(error: BaseException, *, database: str | None = None) -> PermanentOSError | None:
    """The permanent OS error ``error`` is or carries, else None.

    A :class:`PermanentOSError` detkd raised (it knows where training stopped) wins over a raw one found on
    the way (e.g. SQLite failing again while the run was being marked failed on the same full disk)."""
    chain = list(linked(error))
    ours = [e for e in chain if isinstance(e, PermanentOSError)]
    found = [p for e in chain if (p := as_permanent(e, database=database)) is not None]
    return (ours or found or [None])[0]


class QuietPermanentOSErrors(logging.Filter):
    """Drops a library's log record of a permanent OS error it then raises (MLflow logs SQLite's "database
    or disk is full" with its traceback before raising it): detkd reports that error itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and permanent_os_error(error) is not None:
            return False
        return not any(message in record.getMessage() for message in SQLITE_MESSAGES)


# MLflow's SQL store logs each database error with its traceback, then raises it as an MlflowException
MLFLOW_DB_LOGGER = "mlflow.store.db.utils"


def quiet_permanent_os_errors(logger_name: str = MLFLOW_DB_LOGGER) -> None:
    """Install :class:`QuietPermanentOSErrors` on a logger of this process (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, QuietPermanentOSErrors) for f in logger.filters):
        logger.addFilter(QuietPermanentOSErrors())
