"""A Ray run folder's checkpoints, newest first, and the newest one a run can resume from.

Ray Train names checkpoint folders ``checkpoint_<date>_<time>`` (so name order is age order) and copies
each into storage file by file. A copy that fails (a full disk) or a worker killed during it leaves a
folder with missing, empty or cut-short files; the previous folders are untouched. Both files of a
complete checkpoint (``train_state.pt``, ``model.pt``) verify against the checksum and length in their
header, so an incomplete folder is told apart from a good one, skipped, and named with the reason.
Local folders and URIs (``s3://``) are read through the same pyarrow filesystem Ray Train writes with.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs

from detkd.models.checkpoint import CheckpointError, load_payload, verified_bytes

TRAIN_STATE = "train_state.pt"
MODEL_FILE = "model.pt"
PREFIX = "checkpoint_"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it registered

log = logging.getLogger(__name__)


class CheckpointMismatch(RuntimeError):
    """A run folder's checkpoint does not fit the model this code builds."""


@dataclass(frozen=True)
class RunFolder:
    """A Ray run folder on a pyarrow filesystem; ``display`` is how the user wrote it (a folder or a URI)."""

    filesystem: pyarrow.fs.FileSystem
    path: str
    display: str

    @classmethod
    def at(cls, location: str, *, filesystem: pyarrow.fs.FileSystem | None = None, display: str = "") -> RunFolder:
        """``location`` on ``filesystem`` (a path without its scheme), or a folder or URI pyarrow resolves."""
        if filesystem is None:
            uri = location if "://" in location else str(Path(location).absolute())
            filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        else:
            path = location
        return cls(filesystem, path.rstrip("/"), display or location)

    def checkpoints(self) -> list[str]:
        """The ``checkpoint_*`` folder names, newest first."""
        selector = pyarrow.fs.FileSelector(self.path, allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        names = [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory]
        return sorted((n for n in names if n.startswith(PREFIX)), reverse=True)

    def shown(self, name: str) -> str:
        return f"{self.display.rstrip('/')}/{name}"


@dataclass(frozen=True)
class GoodCheckpoint:
    """A checkpoint both of whose files verified; ``state`` is its ``train_state.pt`` payload."""

    name: str
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


@contextmanager
def local_copy(folder: RunFolder, name: str) -> Iterator[Path]:
    """A checkpoint folder as local files: in place on a local filesystem, else downloaded to a temp folder."""
    path = f"{folder.path}/{name}"
    if isinstance(folder.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="detkd-resume-") as tmp:
        pyarrow.fs.copy_files(path, tmp, source_filesystem=folder.filesystem)
        yield Path(tmp)


def read_checkpoint(folder: RunFolder, name: str) -> dict[str, Any]:
    """The ``train_state.pt`` payload of checkpoint ``name`` once both its files verify.

    Raises CheckpointError saying, relative to the checkpoint folder, which file is missing, empty,
    cut short or corrupted (OSError when the filesystem cannot be read)."""
    with local_copy(folder, name) as local:
        try:
            for file in (TRAIN_STATE, MODEL_FILE):
                if not (local / file).is_file():
                    raise CheckpointError(f"incomplete: {file} is missing")
            verified_bytes(local / MODEL_FILE)  # published from the last checkpoint: it must be whole too
            return load_payload(local / TRAIN_STATE)
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(f"{local}/", "")) from None


def newest_good(folder: RunFolder, *, logger: logging.Logger | None = log) -> GoodCheckpoint | None:
    """The newest checkpoint whose files read back whole; each newer one skipped is logged (to ``logger``,
    unless None) with the reason, e.g. ``skipping .../checkpoint_...: train_state.pt: the file is corrupted:
    truncated (0 of 4436300 payload bytes)``."""
    for name in folder.checkpoints():
        try:
            return GoodCheckpoint(name, read_checkpoint(folder, name))
        except (CheckpointError, OSError) as exc:
            if logger is not None:
                logger.warning(f"skipping {folder.shown(name)}: {str(exc).splitlines()[0]}")
    return None


def registered(folder: RunFolder) -> set[str] | None:
    """The checkpoints Ray Train's list of this run names (None when there is no readable list)."""
    path = f"{folder.path}/{SNAPSHOT}"
    try:
        with folder.filesystem.open_input_stream(path) as stream:
            state = json.loads(stream.read().decode())
        return {r["checkpoint_dir_name"] for r in state["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_strays(folder: RunFolder, newest: GoodCheckpoint) -> list[str]:
    """Delete the checkpoint folders older than ``newest`` (the one a run resumes from) that Ray's list does
    not name: copies cut short, or copied whole but never registered (the driver stopped first). Nothing
    reads them again and Ray's ``num_to_keep`` never deletes them; the ones it lists are Ray's to prune.
    Without a readable list nothing is deleted. Returns the names deleted."""
    listed = registered(folder)
    if listed is None:
        return []
    strays = [n for n in folder.checkpoints() if n < newest.name and n not in listed]
    for name in strays:
        folder.filesystem.delete_dir(f"{folder.path}/{name}")
        log.info(f"removed {folder.shown(name)}: older than {newest.name} and not in Ray Train's list of checkpoints")
    return strays


def snapshot_problem(folder: RunFolder, ray_version: str) -> str | None:
    """Why Ray Train could not start from the run folder's list of checkpoints (None when it can, or none exists).

    A write cut short by a full disk leaves it empty or partial, a deleted checkpoint folder leaves it
    pointing nowhere, another Ray version wrote another format: Ray refuses to start the run on each."""
    path = f"{folder.path}/{SNAPSHOT}"
    if folder.filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    try:
        with folder.filesystem.open_input_stream(path) as stream:
            state = json.loads(stream.read().decode())
        names = [r["checkpoint_dir_name"] for r in state["checkpoint_results"]]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})".splitlines()[0]
    if state.get("ray_version") != ray_version:
        return f"written by Ray {state.get('ray_version')}, this is Ray {ray_version}"
    present = set(folder.checkpoints())
    missing = [n for n in names if n not in present]
    if missing:
        return f"lists {missing[0]}, which no longer exists"
    return None


def set_aside_snapshot(folder: RunFolder, why: str) -> str:
    """Rename the run's checkpoint list (see :func:`snapshot_problem`) so Ray Train starts without it; the
    run then resumes from the newest good checkpoint folder. Returns the new name."""
    aside = f"{SNAPSHOT}.unusable"
    folder.filesystem.move(f"{folder.path}/{SNAPSHOT}", f"{folder.path}/{aside}")
    log.warning(
        f"{folder.shown(SNAPSHOT)}: Ray Train's list of this run's checkpoints is {why}; set aside as {aside}, "
        "resuming from the newest good checkpoint folder"
    )
    return aside
