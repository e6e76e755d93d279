"""A checkpoint store that stopped answering, said in one error.

A store that hangs (stops answering on open connections) makes a checkpoint upload wait until it
answers again: training waits with it and goes on. A store that refuses connections fails the upload
after pyarrow's and Ray Train's retries (a few seconds); Ray Train's failure policy then restarts the
workers from the last checkpoint (``run.max_failures``), which rides out an outage shorter than a
restart. A longer one ends the run with pyarrow's ``OSError`` deep inside Ray Train's errors:
:func:`storage_outage` finds it and :class:`StorageUnreachable` says what was kept and what to do.
"""

from __future__ import annotations

from detkd.config import Config
from detkd.oserrors import linked

# pyarrow's S3 errors of a store that does not answer (Ray Train retries uploads on the first five)
UNREACHABLE = (
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error SLOW_DOWN",
    "AWS Error INTERNAL_FAILURE",
    "AWS Error UNKNOWN",
    "curlCode: 7,",  # could not connect
    "curlCode: 28,",  # timed out
)


class StorageUnreachable(RuntimeError):
    """A run stopped because its checkpoint store (``run.storage_path``) did not answer (exit code 1)."""

    def __init__(self, storage: str, detail: str) -> None:
        self.storage, self.detail = storage, detail
        super().__init__(str(self))

    def __str__(self) -> str:
        return (
            f"checkpoint storage {self.storage} did not answer: {self.detail}; the checkpoints it holds are kept; "
            "run the same command again when it answers to resume from the last one"
        )

    def __reduce__(self):  # crosses process boundaries (a pipeline step, a Tune trial)
        return (StorageUnreachable, (self.storage, self.detail))


def storage_outage(error: BaseException, cfg: Config) -> StorageUnreachable | None:
    """The outage of ``cfg``'s checkpoint store that ``error`` is or carries, else None."""
    from detkd.tracking.redact import redact

    chain = list(linked(error))
    for found in [e for e in chain if isinstance(e, OSError)] + [e for e in chain if not isinstance(e, OSError)]:
        for line in str(found).splitlines():
            if any(token in line for token in UNREACHABLE):
                storage = str(cfg.run.storage_path)
                if cfg.run.storage_endpoint:
                    storage += f" at {cfg.run.storage_endpoint}"
                detail = line.strip().removeprefix("OSError: ")
                return StorageUnreachable(redact(storage), redact(detail))
    return None
