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
    """Everything that decides what one training run does, built once on the driver
    (``engine.plan.build_plan``) and read back by workers, checkpoints, ``detkd evaluate`` and serving."""

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


# --------------------------------------------------------------------------- result rows
# summary.json, trials.parquet and outcome.json keep their layout; these read and write it.

SUMMARY_METRICS = ("AP", "AP50", "APs")


@dataclass
class SummaryRow:
    """One model scored on one split: a row of ``summary.json`` (``detkd run``/``evaluate``/``train --summary``)."""

    name: str
    role: str
    input_size: int
    split: str
    AP: float
    AP50: float
    APs: float
    images_per_s: float
    mlflow_run_id: str | None
    method: str | None = None  # absent from the file when None
    registered: str | None = None  # "MODEL vN @alias" once the register step chose this row

    @classmethod
    def measured(
        cls,
        *,
        name: str,
        role: str,
        input_size: int,
        metrics: dict[str, float],
        images_per_s: float,
        run_id: str | None,
        split: str,
        method: str | None = None,
    ) -> SummaryRow:
        """A row from an evaluation's raw numbers, rounded as the file has always shown them."""
        scores = {k: round(metrics[k], 4) for k in SUMMARY_METRICS}
        return cls(
            name,
            role,
            input_size,
            split,
            **scores,
            images_per_s=round(images_per_s, 1),
            mlflow_run_id=run_id,
            method=method,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "mlflow_run_id"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SummaryRow:
        return cls(**data)


@dataclass
class TrialRow:
    """One sweep trial: a row of ``trials.parquet``. Its metric columns are named by the sweep's metric key
    (``val/AP`` and ``best_val/AP``) and its parameters ``param.<name>``, so the key comes with the row."""

    trial_id: str
    state: str
    stopped_early: bool
    epochs: int
    planned_epochs: int
    metric_key: str
    metric: float  # the last reported value
    best_metric: float
    params: dict[str, Any]  # parameter name -> its label (as trials.parquet stores it)
    attempts: int = 0
    mlflow_run_id: str | None = None
    model_path: str | None = None  # the trial's model when it trained to the end
    # cost/mflops, cost/params (every trial) and speed/speedup, speed/latency_ms, ... (trials that trained to
    # the end and had a reference): the columns of trials.parquet of the same names
    measures: dict[str, float] = field(default_factory=dict)
    design: str = ""  # the student in a few words (sweeps.space.design_label)
    feasible: bool = True  # meets every constraint of the space
    unmet: str = ""  # the constraints it breaks, with the measured values
    ruled_out: bool = False  # stopped before training by a cost bound
    pareto: bool = False  # on the Pareto front of the space's objectives

    @property
    def finished(self) -> bool:
        return self.state in ("TERMINATED", "ERROR")

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            "state": self.state,
            "stopped_early": self.stopped_early,
            "epochs": self.epochs,
            "planned_epochs": self.planned_epochs,
            self.metric_key: self.metric,
            f"best_{self.metric_key}": self.best_metric,
            **{f"param.{k}": v for k, v in self.params.items()},
            "attempts": self.attempts,
            "mlflow_run_id": self.mlflow_run_id,
            "model_path": self.model_path,
            "design": self.design,
            **self.measures,
            "feasible": self.feasible,
            "unmet": self.unmet,
            "ruled_out": self.ruled_out,
            "pareto": self.pareto,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, metric_key: str) -> TrialRow:
        return cls(
            trial_id=str(data["trial_id"]),
            state=str(data["state"]),
            stopped_early=bool(data["stopped_early"]),
            epochs=int(data["epochs"]),
            planned_epochs=int(data["planned_epochs"]),
            metric_key=metric_key,
            metric=float(data[metric_key]),
            best_metric=float(data[f"best_{metric_key}"]),
            params={k.removeprefix("param."): v for k, v in data.items() if k.startswith("param.")},
            attempts=int(data.get("attempts", 0)),
            mlflow_run_id=data.get("mlflow_run_id") or None,
            model_path=data.get("model_path") or None,
            measures={
                k: float(v) for k, v in data.items() if k.startswith(("speed/", "cost/")) and v is not None and v == v
            },
            design=str(data.get("design") or ""),
            feasible=bool(data.get("feasible", True)),
            unmet=str(data.get("unmet") or ""),
            ruled_out=bool(data.get("ruled_out", False)),
            pareto=bool(data.get("pareto", False)),
        )


@dataclass
class TrainOutcome:
    """What a finished training run left: its published model, MLflow run and final metrics
    (``models/<step>/outcome.json`` of a pipeline keeps it for later steps)."""

    name: str
    role: str
    model_path: Path
    run_id: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    input_size: int = 0
    seconds: float = 0.0
    method: str = "kd_off"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_path": str(self.model_path)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainOutcome:
        return cls(**{**data, "model_path": Path(data["model_path"])})
