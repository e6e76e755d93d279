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


# --- Checkpoint metadata -------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "detkd.detector"
# The payload's format version; the reader rebuilds each version's network exactly or refuses it.
#   2: ``model`` holds build_detector's keywords. FCOS heads below 64 channels (fpn_channels 32) had torchvision's
#      GroupNorm(32) until detkd commit 7bc5af0 (2026-11-22) and 16 groups after; ``model["design"]`` exists only
#      in files written after both changes (6422bd7), so a file without it does not say which.
#   3: ``model`` is the validated ModelConfig network part (config.NETWORK_KEYS), or arch mmdet's resolved config;
#      FCOS head groups: min(32, channels // 2).
CHECKPOINT_VERSION = 3
CHECKPOINT_VERSIONS_READ = (2, 3)
_META_FIELDS = ("plan", "name", "role", "method", "mlflow_run_id", "step")


@dataclass(frozen=True)
class CheckpointMeta:
    """What a detector checkpoint says about itself next to its weights: format, network, run plan, scores.

    Stored as the payload's ``format`` and ``model`` entries and its flat ``meta`` dict (``plan``,
    ``name``, ``role``, ``method``, ``mlflow_run_id``, ``step``, ``val/...`` metrics), as before.
    """

    model: dict[str, Any]  # the builder config: ModelConfig's network fields, or arch mmdet's resolved config
    format_version: int = CHECKPOINT_VERSION
    plan: dict[str, Any] | None = None  # RunPlan.to_dict()
    name: str | None = None
    role: str | None = None
    method: str | None = None
    mlflow_run_id: str | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # "val/AP", ...
    extra: dict[str, Any] = field(default_factory=dict)  # any other meta keys a caller stored, kept as given

    @property
    def format(self) -> str:
        return f"{CHECKPOINT_FORMAT}/{self.format_version}"

    @property
    def arch(self) -> str:
        return str(self.model.get("arch"))

    @property
    def num_classes(self) -> int:
        return int(self.model["num_classes"])

    def run_plan(self) -> RunPlan | None:
        return RunPlan.from_dict(self.plan) if self.plan is not None else None

    def meta_dict(self) -> dict[str, Any]:
        """The flat ``meta`` dict stored in the file (unset fields left out)."""
        known = {key: getattr(self, key) for key in _META_FIELDS if getattr(self, key) is not None}
        return {**self.extra, **known, **self.metrics}

    @classmethod
    def from_meta_dict(cls, meta: dict[str, Any], *, model: dict[str, Any], format_version: int) -> CheckpointMeta:
        """Split a flat ``meta`` dict into fields, metrics (``val/...``) and anything else."""
        known = {key: meta[key] for key in _META_FIELDS if key in meta}
        metrics = {k: float(v) for k, v in meta.items() if k.startswith("val/")}
        extra = {k: v for k, v in meta.items() if k not in known and k not in metrics}
        return cls(model=dict(model), format_version=format_version, metrics=metrics, extra=extra, **known)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> CheckpointMeta:
        """The meta of a loaded payload; ValueError naming the format when this detkd cannot read it."""
        stored = payload.get("format")
        prefix, _, version = str(stored).partition("/")
        parts = "model" in payload and "state_dict" in payload
        if prefix != CHECKPOINT_FORMAT or not version.isdigit() or not parts:
            raise ValueError(f"not a detkd detector checkpoint (format={stored!r})")
        if int(version) not in CHECKPOINT_VERSIONS_READ:
            readable = ", ".join(f"{CHECKPOINT_FORMAT}/{v}" for v in CHECKPOINT_VERSIONS_READ)
            raise ValueError(f"checkpoint format {stored} is not one this detkd reads ({readable})")
        return cls.from_meta_dict(dict(payload.get("meta") or {}), model=payload["model"], format_version=int(version))
