"""Shared fixtures: a tiny synthetic dataset, a private local Ray cluster, a SQLite MLflow store."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from servers import free_port, serving

from detkd.data.synth import SynthSpec, synthesize

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), and a worker's
# ray.train.report waits for the poll that takes the previous one (a result queue of size 1): the tests' tiny
# epochs (well under a second) would each wait for it, and every run's end is noticed up to one interval late.
# Set before any Ray process starts, so Ray workers, Tune trials and `ray start` heads inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# The tiers (pyproject.toml [tool.pytest.ini_options]): `python -m pytest` runs the tests without these markers;
# `python -m pytest -m ""` runs everything. A test carries the marker of every fixture below that it uses.
TIER_MARKERS = ("ray", "server", "mmdet", "slow")
FIXTURE_MARKERS: dict[str, tuple[str, ...]] = {
    "ray_cluster": ("ray",),
    "trained_detector": ("ray",),
    "trained_lite": ("ray",),
    "quickstart_small": ("ray",),
    "ray_head": ("ray", "server"),
    "mlflow_server": ("server",),
    "server_process": ("server",),
    "s3": ("server",),
    "two_nodes": ("ray", "server"),
    "mmdet": ("mmdet",),
}


def _missing_markers(item, fixturenames) -> list[str]:
    marked = {mark.name for mark in item.iter_markers()}
    return sorted({m for name in fixturenames for m in FIXTURE_MARKERS.get(name, ()) if m not in marked})


def pytest_runtest_setup(item):
    """A test that asks for a Ray, server or MMDetection fixture must carry its marker (checked before the
    fixture starts anything)."""
    missing = _missing_markers(item, getattr(item, "fixturenames", ()))
    if missing:
        pytest.fail(f"{item.nodeid} uses fixtures that need @pytest.mark.{', @pytest.mark.'.join(missing)}", False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """The same check for fixtures a test fetched itself (request.getfixturevalue)."""
    result = yield
    request = getattr(item, "_request", None)
    missing = _missing_markers(item, getattr(request, "fixturenames", ()) if request is not None else ())
    if missing:
        pytest.fail(f"{item.nodeid} fetched fixtures that need @pytest.mark.{', @pytest.mark.'.join(missing)}", False)
    return result


@pytest.hookimpl(trylast=True)  # after the durations and the short summary, just above the final line
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After the default (fast) tier, one line on what it left out and how to run everything."""
    if config.option.markexpr != DEFAULT_TIER:
        return
    left_out = len(terminalreporter.stats.get("deselected", []))
    if left_out:
        terminalreporter.write_line(
            f"fast tier: {left_out} tests not run ({'/'.join(TIER_MARKERS)}); "
            'run everything with: python -m pytest -m ""'
        )


DEFAULT_TIER = "not (ray or server or mmdet or slow)"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """48 easy 64 px images (objects 10-28 px) under <tmp>/data."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    synthesize(
        root,
        SynthSpec(
            images=48, size=64, seed=3, val_fraction=0.25, min_object=10, max_object=28, max_objects=3, clutter=0.1
        ),
    )
    return root


@pytest.fixture(scope="session")
def varied_dataset(tmp_path_factory) -> Path:
    """48 images of varied sizes and aspect ratios (odd sides included), as real datasets have."""
    root = tmp_path_factory.mktemp("varied") / "data"
    synthesize(
        root,
        SynthSpec(
            images=48,
            size=64,
            seed=4,
            val_fraction=0.25,
            min_object=8,
            max_object=20,
            max_objects=3,
            clutter=0.1,
            aspect_ratios=(0.6, 1.6),
            size_jitter=0.2,
        ),
    )
    return root


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray instance owned by this test session (shut down at the end, nothing else touched).

    Started as detkd starts its private instances (``start_local_ray``): its processes know its address, so
    a ``detkd`` subprocess that starts its own Ray meanwhile confuses neither (tests/faults/test_two_drivers.py)."""
    import ray

    from detkd.engine.ray_instance import start_local_ray

    if ray.is_initialized():
        yield ray
        return
    start_local_ray(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture()
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture()
def tracking(mlflow_uri):
    """The tracking context of runs logged to ``mlflow_uri`` (what a pipeline or the CLI resolves)."""
    from detkd.records import TrackingContext

    return TrackingContext(uri=mlflow_uri, experiment="detkd")


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: ``tiny_config(dataset, workdir, train={...})`` -> run config dict."""
    return tiny_config_dict


def tiny_config_dict(dataset: Path, work: Path, **sections) -> dict:
    """A run config that trains a tiny FCOS for a handful of steps on ``dataset``."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {
            "train": {
                "coco": str(dataset / "annotations/instances_train.json"),
                "images": str(dataset / "images/train"),
            },
            "val": {"coco": str(dataset / "annotations/instances_val.json"), "images": str(dataset / "images/val")},
        },
        "model": {
            "arch": "fcos",
            "backbone": "tiny",
            "fpn_channels": 32,
            "head_convs": 1,
            "min_level": 3,
            "max_level": 6,
        },
        "input": {"size": 64},
        "optim": {"lr": 0.002, "warmup_iters": 2},
        "train": {"epochs": 2, "batch_size": 8, "log_every": 2},
        "run": {"storage_path": str(work / "ray"), "output_dir": str(work / "models")},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture()
def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server a test starts)."""
    return free_port()


@pytest.fixture()
def dead_server_uri(unused_port) -> str:
    """An http URI on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{unused_port}"


class MlflowServer(NamedTuple):
    uri: str
    artifacts: Path  # the server's artifact root (what mlflow-artifacts:/ URIs point into)


@pytest.fixture(scope="session")
def server_process():
    """``serving`` for tests that start a server of their own (``mlflow models serve``)."""
    return serving


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, local artifact root)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    uri = f"http://127.0.0.1:{free_port()}"
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1"]
    command += [
        "--port",
        uri.rsplit(":", 1)[1],
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
    ]
    command += ["--artifacts-destination", str(root / "artifacts")]
    with serving(command, ready_url=f"{uri}/health", log_path=root / "server.log", wait_s=120):
        yield MlflowServer(uri, root / "artifacts")


class TrainedDetector(NamedTuple):
    tracking_uri: str
    run_id: str
    model_path: Path


@pytest.fixture(scope="session")
def trained_detector(tiny_dataset, tiny_config, ray_cluster, tmp_path_factory):
    """A tiny FCOS trained 12 epochs through Ray Train and logged to its own SQLite store (with its
    pyfunc model); the tests that deploy a model share it."""
    from detkd.config import Config
    from detkd.engine.launch import run_training
    from detkd.records import TrackingContext

    work = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = Config.model_validate(tiny_config(tiny_dataset, work, train={"epochs": 12}, optim={"lr": 0.004}))
    outcome = run_training(cfg, tracking=TrackingContext(uri=uri, experiment="detkd"))
    return TrainedDetector(uri, outcome.run_id, outcome.model_path)


QUICKSTART_SHRINK = [
    "data.synth.images=40",
    "data.synth.test_images=12",  # the quickstart's held-out split, small
    "data.synth.size=64",
    "data.synth.min_object=10",
    "data.synth.max_object=32",
    "data.synth.aspect_ratios=[0.7, 1.4]",  # non-square images of varied (odd) sizes, long side capped
    "data.synth.size_jitter=0.15",
    "defaults.input.max_size=80",
    "defaults.input.size=64",
    "defaults.train.epochs=1",
    "students.student_baseline.settings.train.epochs=1",  # the quickstart's students set their own
    "students.student_ssim.settings.train.epochs=1",
    "defaults.train.batch_size=8",
    "defaults.model.fpn_channels=32",
    "defaults.tracking.log_model=false",
]


class QuickstartRun(NamedTuple):
    work: Path  # the pipeline's workdir
    uri: str  # its MLflow store
    rows: list[dict]  # the summary rows
    output: str  # what `detkd run` printed
    decoy: Path  # MLFLOW_TRACKING_URI pointed here during the run; the spec's setting must win
    shrink: list[str]  # the --set items that shrank the quickstart


@pytest.fixture(scope="session")
def quickstart_small(ray_cluster, tmp_path_factory) -> QuickstartRun:
    """``detkd run pipelines/quickstart.yaml`` shrunk to seconds, once per session: the tests of the
    pipeline's results and the Kubeflow run that must match it share this run."""
    import json

    from typer.testing import CliRunner

    from detkd.cli import app

    folder = tmp_path_factory.mktemp("quickstart")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    decoy = folder / "env-mlflow.db"
    summary = folder / "summary.json"
    args = ["run", str(Path(__file__).resolve().parents[1] / "pipelines/quickstart.yaml"), "--summary", str(summary)]
    for item in [f"workdir={folder / 'work'}", f"tracking.tracking_uri={uri}", *QUICKSTART_SHRINK]:
        args += ["--set", item]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{decoy}")
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return QuickstartRun(folder / "work", uri, json.loads(summary.read_text()), result.output, decoy, QUICKSTART_SHRINK)
