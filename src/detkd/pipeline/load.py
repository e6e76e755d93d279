"""A pipeline spec loaded for running: :func:`read_pipeline` plus its sweeps' search spaces checked."""

from __future__ import annotations

from pathlib import Path

from detkd.config import ConfigError
from detkd.pipeline.spec import PipelineSpec, read_pipeline
from detkd.sweeps.space import load_space


def load_pipeline(path: Path, overrides: list[str] | None = None) -> PipelineSpec:
    """The validated spec at ``path``; every tune step's space is applied to its target and checked."""
    spec = read_pipeline(path, overrides)
    for i, step in enumerate(spec.tune):
        try:
            load_space(step.space, pipeline=spec)
        except ConfigError as exc:
            raise ConfigError(f"{path}: tune[{i}] ({step.name}): {exc}") from None
    return spec
