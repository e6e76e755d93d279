"""A tiny two-teacher pipeline and space files for the sweep tests (64 px synthetic shapes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


def tiny_pipeline(work: Path, mlflow_uri: str) -> dict:
    return {
        "name": "tiny",
        "workdir": str(work),
        "tracking": {"experiment": "sweeps", "tracking_uri": mlflow_uri},
        "data": {
            "synth": {
                "images": 80,
                "test_images": 16,
                "size": 64,
                "seed": 0,
                "val_fraction": 0.25,
                "min_object": 12,
                "max_object": 28,
                "max_objects": 2,
                "clutter": 0.0,
            }
        },
        "defaults": {
            "model": {"arch": "fcos", "backbone": "tiny", "fpn_channels": 32, "head_convs": 1},
            "input": {"size": 64},
            "train": {"epochs": 2, "batch_size": 8, "log_every": 100},
            "optim": {"warmup_iters": 4},
            "eval": {"batch_size": 16},
        },
        "teachers": [
            {"name": "t_small"},
            {"name": "t_wide", "settings": {"model": {"fpn_channels": 64}}},
        ],
        "students": [
            {
                "name": "student",
                "settings": {
                    "input": {"scale": 0.5},
                    "model": {"min_level": 2, "max_level": 6},
                    "train": {"epochs": 3},
                    "distill": {"teachers": [{"source": "t_small"}], "mgd": {"weight": 2.0e-5}},
                },
            }
        ],
    }


@pytest.fixture(scope="session")
def sweep_store(tmp_path_factory) -> tuple[Path, str]:
    """(work folder, tracking URI) shared by the sweep tests: the pipeline's teachers are trained by the first
    sweep that needs them and found again (by plan digest) by the others, as a user's later sweeps would."""
    root = tmp_path_factory.mktemp("sweeps")
    return root / "work", f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture()
def sweep_uri(sweep_store) -> str:
    return sweep_store[1]


@pytest.fixture()
def sweep_files(tmp_path, sweep_store):
    """Factory: ``sweep_files(parameters, budget=..., **space)`` -> (space path, pipeline path).

    Each test's space and pipeline files are its own; the workdir and tracking store are the session's
    (``sweep_store``), so give each sweep its own ``name``."""
    work, uri = sweep_store
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(tiny_pipeline(work, uri)))

    def make(parameters: dict, *, budget: dict | None = None, name: str = "dev", **extra) -> tuple[Path, Path]:
        space = {
            "name": name,
            "target": {"pipeline": str(pipeline), "student": "student"},
            "parameters": parameters,
            "budget": budget or {},
            **extra,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(space, sort_keys=False))
        return path, pipeline

    return make
