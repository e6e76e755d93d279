"""Where a sweep keeps its Tune experiment and its trials' Train runs.

With the target's ``run.storage_path`` a URI (``s3://...``, with ``run.storage_endpoint`` for
S3-compatible stores), both go under ``<storage_path>/sweeps/<name>/``: every node reads and writes
them there, so a trial lost with its node resumes from its last checkpoint on another node, and a
sweep whose driver was lost resumes from the experiment state stored there. With a local
storage path they stay in the sweep's folder (``tune/``, ``train/``), as a single machine needs.
The sweep's state (``sweep.json``: which sweep this is, its MLflow run) is kept beside the experiment; its
tables, plots and models are written to the sweep's folder either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detkd.config import Config

# The credentials and region of the process that starts a sweep: its trials start their Train runs on other
# nodes, whose environment may have none (engine.launch.storage_target reads them from the environment).
STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepStorage:
    """A sweep's experiment and trial storage: ``root`` (a folder or a URI) and, for Ray, the same place as
    ``(path, filesystem)`` (``filesystem`` None: Ray resolves ``path`` itself)."""

    root: str
    path: str
    filesystem: Any = None

    @property
    def remote(self) -> bool:
        return "://" in self.root

    @property
    def shown(self) -> str:
        """``root`` for messages (a password or secret query value masked)."""
        from detkd.tracking.redact import redact

        return redact(self.root)

    @property
    def tune(self) -> str:
        """The Tune experiment's path (with ``filesystem``): ``Tuner.restore`` and ``can_restore`` take it."""
        return f"{self.path}/tune"

    @property
    def train(self) -> str:
        """The trials' ``run.storage_path``."""
        return join(self.root, "train")

    def read(self, name: str) -> bytes | None:
        """The file ``name`` beside the experiment, or None when there is none."""
        if not self.remote:
            path = Path(self.path) / name
            return path.read_bytes() if path.is_file() else None
        filesystem, path = self._resolved()
        try:
            with filesystem.open_input_stream(f"{path}/{name}") as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` beside the experiment in one piece (a local file atomically; an S3 object is)."""
        if not self.remote:
            from detkd.models.checkpoint import atomic_write_bytes

            atomic_write_bytes(Path(self.path) / name, data)
            return
        filesystem, path = self._resolved()
        with filesystem.open_output_stream(f"{path}/{name}") as stream:
            stream.write(data)

    def discard(self) -> None:
        """``--fresh``: forget the stored experiment and trial checkpoints."""
        filesystem, path = self._resolved()
        with contextlib.suppress(FileNotFoundError):
            filesystem.delete_dir(path)

    def _resolved(self) -> tuple[Any, str]:
        import pyarrow.fs

        if self.filesystem is not None:
            return self.filesystem, self.path
        filesystem, path = pyarrow.fs.FileSystem.from_uri(self.path)
        return filesystem, path


def sweep_storage(base: Config, *, name: str, workdir: Path) -> SweepStorage:
    """The target's storage for a sweep named ``name``: ``<run.storage_path>/sweeps/<name>`` for a URI, else
    ``workdir``."""
    from detkd.engine.launch import storage_target

    storage = str(base.run.storage_path)
    if "://" not in storage:
        return SweepStorage(root=str(workdir), path=str(workdir))
    root = join(storage, f"sweeps/{name}")
    run = base.run.model_copy(update={"storage_path": root})
    path, filesystem = storage_target(base.model_copy(update={"run": run}))
    return SweepStorage(root=root, path=path, filesystem=filesystem)


def join(location: str, tail: str) -> str:
    """``location/tail`` for a folder or a URI (a URI's query string stays at the end)."""
    head, mark, query = location.partition("?")
    return f"{head.rstrip('/')}/{tail}{mark}{query}"


def storage_keys(storage: SweepStorage) -> dict[str, str]:
    """The variables of this process that the trials need to reach remote storage (none for a local folder)."""
    if not storage.remote:
        return {}
    return {key: os.environ[key] for key in STORAGE_ENV if os.environ.get(key)}
