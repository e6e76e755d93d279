"""Helpers of the checkpoint and disk fault tests: a real ``detkd`` subprocess, its output read as a user
reads it, a run folder's checkpoints read back with detkd's own loader, and a small filesystem."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from detkd.engine.checkpoints import MODEL_FILE, TRAIN_STATE
from detkd.models.checkpoint import CheckpointError, load_payload, verified_bytes

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=False)
def no_ray_in_pytest():
    """These tests' ``detkd`` subprocesses start their own local Ray; a Ray held by this pytest process (the
    session's ``ray_cluster``, started by earlier tests) would make two on one machine, and Ray Train's
    placement-group cleaner fails on that ("Found multiple active Ray instances"). It is stopped for the
    module and started again after it as conftest.py starts it."""
    import ray

    held = ray.is_initialized()
    if held:
        ray.shutdown()
    yield
    if held:
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def detkd_env(extra_path: Path | None = None) -> dict[str, str]:
    """The environment of a ``detkd`` subprocess (and of the Ray processes it starts): this checkout's code."""
    paths = [str(extra_path)] if extra_path else []
    return os.environ | {"PYTHONPATH": os.pathsep.join([*paths, str(REPO / "src")]), "COLUMNS": "200"}


def run_detkd(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "detkd.cli", *args],
        cwd=REPO,
        env=env or detkd_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_detkd(args: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A ``detkd`` command in the background, its output (stdout and stderr) going to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "detkd.cli", *args], cwd=REPO, env=env or detkd_env(), stdout=out, stderr=out
        )


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def attempts(output: str) -> int:
    """How many times Ray Train started the worker group (1 = no restart by the failure policy)."""
    return output.count("Started training worker group")


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def checkpoint_folders(storage: Path) -> list[Path]:
    """Every ``checkpoint_*`` folder of the one Ray run under ``storage``, oldest first."""
    return sorted(path for path in storage.glob("*/checkpoint_*") if path.is_dir())


def readable_step(folder: Path) -> int | None:
    """The step of a checkpoint folder both of whose files load with detkd's own loader; None if not."""
    try:
        verified_bytes(folder / MODEL_FILE)
        return int(load_payload(folder / TRAIN_STATE)["step"])
    except CheckpointError:
        return None


def good_steps(storage: Path) -> dict[str, int]:
    return {f.name: step for f in checkpoint_folders(storage) if (step := readable_step(f)) is not None}


def wait_for(predicate, *, timeout: float, every: float = 0.2, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(every)
    return False


def checkpoint_bytes(config: dict) -> int:
    """About how many bytes one checkpoint of ``config`` takes (model, AdamW's two moments, the model file)."""
    from detkd.config import Config
    from detkd.engine.build import build_trainable
    from detkd.engine.plan import build_plan
    from detkd.records import TrackingContext

    plan = build_plan(Config.model_validate(config), tracking=TrackingContext(uri="sqlite:///x.db", experiment="x"))
    model = build_trainable(plan, device="meta")[0]
    params = sum(t.numel() for t in model.parameters())
    buffers = sum(t.numel() for t in model.buffers())
    return int((16 * params + 8 * buffers) * 1.05) + 64_000


# Where mounting is refused (not root), a full disk is injected instead: Ray Train's checkpoint upload
# (pyarrow.fs.copy_files) into DIR writes half of each file and fails with ENOSPC, while DIR/filler exists,
# from the LIMIT-th upload on. Every process of the run (the driver, Ray's workers) loads this first.
INJECTOR = """
import errno, os
import pyarrow.fs

DIR, LIMIT = {folder!r}, {limit!r}
_copy_files = pyarrow.fs.copy_files


def copy_files(source, destination, *args, **kwargs):
    counter = os.path.join(DIR, ".uploads")
    if not str(destination).startswith(DIR) or not os.path.exists(os.path.join(DIR, "filler")):
        return _copy_files(source, destination, *args, **kwargs)
    done = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(done + 1))
    if done + 1 < LIMIT:
        return _copy_files(source, destination, *args, **kwargs)
    os.makedirs(destination, exist_ok=True)
    for name in sorted(os.listdir(source)):
        data = open(os.path.join(source, name), "rb").read()
        open(os.path.join(destination, name), "wb").write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")


pyarrow.fs.copy_files = copy_files
"""


class SmallFilesystem(NamedTuple):
    root: Path
    mounted: bool  # a real tmpfs; else a folder where INJECTOR fails the uploads
    injector: Path | None  # the folder to put first on PYTHONPATH when not mounted


@contextlib.contextmanager
def small_filesystem(root: Path, *, size_mb: int, uploads_before_full: int = 3) -> Iterator[SmallFilesystem]:
    """A tmpfs of ``size_mb`` MB at ``root`` (unmounted afterwards), or, where this machine refuses to mount
    (or DETKD_TEST_FS=inject), a plain folder whose checkpoint uploads fail from the ``uploads_before_full``-th
    on while ``root/filler`` exists."""
    root.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.environ.get("DETKD_TEST_FS") != "inject":
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(root)], capture_output=True, text=True
        )
        mounted = done.returncode == 0
    injector = None
    if not mounted:
        injector = root.parent / f"{root.name}-injector"
        injector.mkdir(exist_ok=True)
        (injector / "sitecustomize.py").write_text(INJECTOR.format(folder=str(root), limit=uploads_before_full))
    try:
        yield SmallFilesystem(root, mounted, injector)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], check=False)


def fill(fs: SmallFilesystem, *, leave: int) -> Path:
    """Write ``fs.root/filler`` so that about ``leave`` bytes stay free (a marker file where not mounted)."""
    filler = fs.root / "filler"
    if not fs.mounted:
        filler.write_bytes(b"")
        return filler
    stat = os.statvfs(fs.root)
    free = stat.f_bavail * stat.f_frsize
    if free <= leave:
        raise OSError(errno.ENOSPC, f"{fs.root}: only {free} bytes free, {leave} wanted")
    with open(filler, "wb") as out:
        out.truncate(0)
        out.write(b"\0" * (free - leave))
    return filler
