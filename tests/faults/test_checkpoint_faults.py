"""Faults around training and its checkpoints, for real, each in a ``detkd train`` subprocess that starts its own
local Ray: SIGTERM to the driver (a cluster preempting the pod), a Ray Train worker SIGKILLed while it copies a
checkpoint into storage, an image that passes validation but cannot be decoded when training reads it."""

from __future__ import annotations

import re
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
from ckpt_helpers import (  # noqa: F401 - no_ray_in_pytest is a fixture
    attempts,
    checkpoint_folders,
    error_lines,
    good_steps,
    no_ray_in_pytest,
    readable_step,
    run_detkd,
    start_detkd,
    wait_for,
    write_config,
)
from mlflow import MlflowClient

from detkd.engine.checkpoints import MODEL_FILE, TRAIN_STATE
from detkd.models.checkpoint import load_detector

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.usefixtures("no_ray_in_pytest")]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_sigterm_to_the_driver_ends_resumable_and_the_rerun_resumes(tiny_dataset, tiny_config, tmp_path):
    work = tmp_path / "work"
    data = tiny_config(
        tiny_dataset,
        work,
        train={"epochs": 6, "log_every": 1, "checkpoint_every_steps": 2},
        tracking={"log_model": False, "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
    )
    config = write_config(tmp_path / "teacher.yaml", data)
    work.mkdir()
    storage = work / "ray"
    driver = start_detkd(["train", str(config)], log=tmp_path / "first.log")
    try:
        started = wait_for(lambda: len(good_steps(storage)) >= 2, timeout=240, proc=driver)
        assert started, (tmp_path / "first.log").read_text()[-3000:]
        ray_processes = _descendants(driver.pid)  # the local Ray this driver started: it must not outlive it
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = (tmp_path / "first.log").read_text()
    assert driver.returncode == 143, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "terminated (SIGTERM): the checkpoints are kept; run the same command again to resume" in output
    assert not error_lines(output)
    gone = psutil.wait_procs(ray_processes, timeout=30)[1]
    assert not gone, [p.cmdline() for p in gone]
    steps = good_steps(storage)
    last = max(steps.values())
    assert 2 <= last < 24  # stopped mid-run, with checkpoints kept
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("detkd").experiment_id])
    assert run.info.status == "KILLED"

    second = run_detkd(["train", str(config)])
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    name = max(steps, key=lambda n: (steps[n], n))
    assert f"resumed from step {last}/24 ({name})" in output
    assert load_detector(work / "models/tiny/model.pt")[1]["step"] == 24
    assert client.get_run(run.info.run_id).info.status == "FINISHED"  # the same MLflow run, continued


def _incomplete(folder: Path) -> bool:
    """A checkpoint folder whose files Ray is still copying (or never finished copying)."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return not {TRAIN_STATE, MODEL_FILE, f"{TRAIN_STATE}.sha256", f"{MODEL_FILE}.sha256"} <= names or (
        readable_step(folder) is None
    )


def _train_worker(log: Path) -> psutil.Process | None:
    """The rank-0 Ray Train worker of the run whose driver writes ``log`` (Ray prefixes its lines with its pid)."""
    found = re.findall(r"\(RayTrainWorker pid=(\d+)\)", log.read_text())
    return psutil.Process(int(found[0])) if found else None


def test_a_worker_killed_during_a_checkpoint_upload_restarts_from_the_last_complete_one(
    tiny_dataset, tiny_config, tmp_path
):
    """The storage folder is watched for a new checkpoint folder; the worker is frozen (SIGSTOP) while that
    folder is still incomplete, then SIGKILLed: Ray's copy of it is cut short for good."""
    work = tmp_path / "work"
    data = tiny_config(
        tiny_dataset,
        work,
        model={"fpn_channels": 128},  # checkpoints of about 20 MB: their copy takes a while
        train={"epochs": 3, "log_every": 4, "checkpoint_every_steps": 1},
        run={"max_failures": 1},
        tracking={"log_model": False, "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
    )
    config = write_config(tmp_path / "teacher.yaml", data)
    work.mkdir()
    storage = work / "ray"
    driver = start_detkd(["train", str(config)], log=tmp_path / "train.log")
    killed: Path | None = None
    kept: dict[str, int] = {}
    try:
        assert wait_for(lambda: checkpoint_folders(storage), timeout=240, every=0.05, proc=driver)
        worker = _train_worker(tmp_path / "train.log")
        assert worker is not None and "RayTrainWorker" in " ".join(worker.cmdline())
        seen = {f.name for f in checkpoint_folders(storage)}
        deadline = time.monotonic() + 120
        while killed is None and driver.poll() is None and time.monotonic() < deadline:
            for folder in checkpoint_folders(storage):
                if folder.name in seen:
                    continue
                seen.add(folder.name)
                if not _incomplete(folder):
                    continue
                worker.send_signal(signal.SIGSTOP)
                if _incomplete(folder):
                    worker.send_signal(signal.SIGKILL)
                    killed = folder
                    kept = {n: step for n, step in good_steps(storage).items() if n < folder.name}
                    break
                worker.send_signal(signal.SIGCONT)
            time.sleep(0.001)
        assert killed is not None, "no checkpoint upload was caught in progress"
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = (tmp_path / "train.log").read_text()
    assert driver.returncode == 0, output[-3000:]
    assert _incomplete(killed) and readable_step(killed) is None  # the half-copied checkpoint stays as it was
    assert kept, "no complete checkpoint before the killed one"
    newest = max(kept)
    resumed = re.findall(r"resumed from step (\d+)/12 \((checkpoint_\S+)\)", output)
    # restarted once, from the newest checkpoint that was complete when the worker was killed
    assert attempts(output) == 2 and resumed == [(str(kept[newest]), newest)], output[-3000:]
    assert f"skipping {killed}: " in output  # the half-copied one, named, with the reason
    assert load_detector(work / "models/tiny/model.pt")[1]["step"] == 12


def _truncate_after_header(image: Path) -> None:
    """Keep the PNG's header (its size reads fine) and cut the pixel data short."""
    data = image.read_bytes()
    image.write_bytes(data[: max(120, len(data) // 3)])


def test_a_corrupt_image_met_during_training_stops_the_run_or_is_skipped(tiny_dataset, tiny_config, tmp_path):
    from detkd.data import load_coco
    from detkd.engine.sampler import EpochBatchSampler

    dataset = tmp_path / "data"
    shutil.copytree(tiny_dataset, dataset)
    source = load_coco(dataset / "annotations/instances_train.json", dataset / "images/train")
    first_read = EpochBatchSampler(size=len(source.records), batch_size=8, seed=0).global_order()[0]
    image = dataset / "images/train" / source.records[first_read].file_name  # in the first batch
    _truncate_after_header(image)
    work = tmp_path / "work"
    data = tiny_config(
        dataset,
        work,
        train={"epochs": 1, "log_every": 1},
        run={"max_failures": 2},
        tracking={"log_model": False, "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
    )
    config = write_config(tmp_path / "teacher.yaml", data)
    work.mkdir()

    stopped = run_detkd(["train", str(config)])
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 2, output[-3000:]  # the data is at fault: a user error
    assert "Traceback" not in output, output[-3000:]
    assert attempts(output) == 1  # not retried: the next attempt would read the same file
    (line,) = error_lines(output)
    assert f"error: {image}: image id=" in line and "cannot decode image" in line and "--skip-invalid" in line

    skipped = run_detkd(["train", str(config), "--skip-invalid"])
    output = skipped.stdout + skipped.stderr
    assert skipped.returncode == 0, output[-3000:]
    warnings = [line for line in output.splitlines() if "skipping an unreadable training image" in line]
    assert len(warnings) == 1 and str(image) in warnings[0], output[-3000:]
    assert load_detector(work / "models/tiny/model.pt")[1]["step"] == 4
