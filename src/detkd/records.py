"""Typed records that travel between the driver, Ray workers, checkpoints and result files.

The run plan and its parts live here, below every package that reads them (the engine builds a
plan, the serving code reads one back from a checkpoint), so reading one needs neither Ray,
MLflow nor the engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detkd.config import Config, ConfigError

PLAN_VERSION = 1


@dataclass(frozen=True)
class InputSpec:
    """How images reach the model: resize the short side to ``size`` (long side capped at
    ``max_size``), then scale by ``scale``; the model normalises with ``mean``/``std``."""

    size: int
    max_size: int | None
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def model_size(self) -> int:
        """The model's short side in pixels (before any ``max_size`` cap)."""
        return int(round(self.size * self.scale))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        return cls(
            size=data["size"],
            max_size=data["max_size"],
            scale=data["scale"],
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
        )


@dataclass(frozen=True)
class TeacherSpec:
    """A frozen teacher resolved to a checkpoint file, with its input scale vs the student's reference view."""

    source: str
    path: str
    scale: float
    sha256: str
    name: str
    model: dict[str, Any] = field(default_factory=dict)  # the builder config stored in its checkpoint
    mlflow_run_id: str | None = None


@dataclass(frozen=True)
class TrackingContext:
    """Where the run is logged: one URI and experiment for a pipeline's parent run and all its children."""

    uri: str
    experiment: str
    parent_run_id: str | None = None


@dataclass(frozen=True)
class RunPlan:
    config: Config
    digest: str
    teachers: tuple[TeacherSpec, ...]
    input: InputSpec
    tracking: TrackingContext
    categories: tuple[tuple[int, str], ...]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes or len(self.categories)

    @property
    def ray_name(self) -> str:
        """The Ray run folder name: the same training settings resume the same run."""
        return f"{self.config.name}-{self.digest}"

    @property
    def out_dir(self) -> Path:
        """Where the finished model is published (``<out_dir>/model.pt``)."""
        return Path(self.config.run.output_dir) / self.config.name

    @property
    def distilling(self) -> bool:
        return bool(self.teachers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in checkpoints and sent to Ray workers)."""
        return {
            "version": PLAN_VERSION,
            "config": self.config.model_dump(mode="json"),
            "digest": self.digest,
            "teachers": [asdict(t) for t in self.teachers],
            "input": self.input.to_dict(),
            "tracking": asdict(self.tracking),
            "categories": [list(c) for c in self.categories],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        if data.get("version") != PLAN_VERSION:
            raise ConfigError(f"run plan version {data.get('version')!r} is not {PLAN_VERSION}")
        return cls(
            config=Config.model_validate(data["config"]),
            digest=data["digest"],
            teachers=tuple(TeacherSpec(**t) for t in data["teachers"]),
            input=InputSpec.from_dict(data["input"]),
            tracking=TrackingContext(**data["tracking"]),
            categories=tuple((int(i), str(n)) for i, n in data["categories"]),
        )


