"""A full disk, for real: a run whose workdir (Ray storage, published models, the SQLite tracking store) lies on
a small tmpfs the test mounts. The run ends in one ``error:`` line naming the path and ENOSPC, exit code 1,
without Ray Train's retries; the checkpoints written before stay loadable; after space is freed the same
command resumes from the newest good checkpoint, skipping the one the full disk cut short."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from ckpt_helpers import (  # noqa: F401 - no_ray_in_pytest is a fixture
    attempts,
    checkpoint_bytes,
    checkpoint_folders,
    detkd_env,
    error_lines,
    fill,
    good_steps,
    no_ray_in_pytest,
    readable_step,
    run_detkd,
    small_filesystem,
    write_config,
)
from mlflow import MlflowClient

from detkd.models.checkpoint import load_detector

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.usefixtures("no_ray_in_pytest")]


def _experiment(uri: str, artifacts: Path) -> None:
    """The tracking store's experiment, made before the disk fills (its artifacts where the test says)."""
    MlflowClient(uri).create_experiment("detkd", artifact_location=str(artifacts))


def test_disk_full_at_a_checkpoint_stops_once_and_the_rerun_resumes_from_the_newest_good_one(
    tiny_dataset, tiny_config, tmp_path
):
    with small_filesystem(tmp_path / "small", size_mb=32) as fs:
        work = fs.root / "work"
        uri = f"sqlite:///{work / 'mlflow.db'}"
        data = tiny_config(
            tiny_dataset,
            work,
            train={"epochs": 2, "log_every": 1, "checkpoint_every_steps": 2},
            run={"max_failures": 2},  # retries are allowed: the full disk must not use them
            tracking={"log_model": False, "tracking_uri": uri},
        )
        config = write_config(tmp_path / "teacher.yaml", data)
        work.mkdir()
        _experiment(uri, work / "mlartifacts")
        fill(fs, leave=int(2.5 * checkpoint_bytes(data)))  # room for two checkpoints, not a third
        env = detkd_env(fs.injector)

        first = run_detkd(["train", str(config)], env=env)
        output = first.stdout + first.stderr
        assert first.returncode == 1, output[-4000:]
        assert "Traceback" not in output, output[-4000:]
        assert attempts(output) == 1 and "resumed from" not in output  # no restart by the failure policy
        (line,) = error_lines(output)
        storage = work / "ray"
        match = re.search(rf"ENOSPC\) writing ({re.escape(str(storage))}/\S+/(checkpoint_\S+)): training stopped", line)
        assert match and "no space left on device" in line, line
        failed = Path(match[1])
        kept = re.search(r"(checkpoint_\S+) \(step (\d+)\) is kept", line)
        assert kept, line
        assert "free space and run the same command again to resume" in line
        # what was written before the disk filled still loads; the cut-short one is recognisably incomplete
        steps = good_steps(storage)
        assert steps[kept[1]] == int(kept[2]) == max(steps.values()) and len(steps) >= 2
        assert failed.is_dir() and readable_step(failed) is None

        (fs.root / "filler").unlink()  # free space; the same command again
        second = run_detkd(["train", str(config)], env=env)
        output = second.stdout + second.stderr
        assert second.returncode == 0, output[-4000:]
        assert f"skipping {failed}: " in output  # says which it skipped, and why
        assert f"resumed from step {kept[2]}/8 ({kept[1]})" in output
        model, meta = load_detector(work / "models/tiny/model.pt")
        assert meta["step"] == 8
        run = MlflowClient(uri).get_run(meta["mlflow_run_id"])
        assert run.info.status == "FINISHED"  # the interrupted attempt's MLflow run, continued
        assert readable_step(checkpoint_folders(storage)[-1]) == 8


def test_disk_full_at_the_mlflow_artifact_upload_keeps_the_model_and_checkpoints(tiny_dataset, tiny_config, tmp_path):
    """Training finishes, the model is published; MLflow's artifact store (on a 1 MB filesystem) cannot take
    the model file."""
    work = tmp_path / "work"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    data = tiny_config(tiny_dataset, work, train={"epochs": 1}, tracking={"log_model": False, "tracking_uri": uri})
    config = write_config(tmp_path / "teacher.yaml", data)
    work.mkdir()
    with small_filesystem(tmp_path / "artifacts", size_mb=1) as fs:
        if not fs.mounted:
            pytest.skip("needs a small filesystem of its own (mount -t tmpfs)")
        _experiment(uri, fs.root)
        result = run_detkd(["train", str(config)])
        output = result.stdout + result.stderr
        assert result.returncode == 1, output[-4000:]
        assert "Traceback" not in output, output[-4000:]
        (line,) = error_lines(output)
        assert "no space left on device (ENOSPC) writing the artifacts of MLflow run" in line, line
        assert str(fs.root) in line and "training finished: its model is published at" in line, line
        model_path = work / "models/tiny/model.pt"
        assert str(model_path) in line
        _, meta = load_detector(model_path)
        assert meta["step"] == 4
        assert max(good_steps(work / "ray").values()) == 4
    shutil.rmtree(tmp_path / "artifacts-injector", ignore_errors=True)
