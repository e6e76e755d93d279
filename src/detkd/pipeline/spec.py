"""The pipeline spec: its schema, the run config of each entry, its data splits and tracking context.

Every model entry is a partial run config merged over the spec's ``defaults`` (one
level, no inheritance chains) and validated before anything runs. No Ray, no MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field, model_validator

from detkd.config import (
    Config,
    ConfigError,
    SplitConfig,
    _Section,
    apply_overrides,
    deep_merge,
    read_yaml,
    validate_config,
)
from detkd.data.synth import SynthSpec
from detkd.serving.speed import SpeedSettings


class PipelineTracking(_Section):
    """Where a pipeline logs: its parent run and every child run use these, and nothing else."""

    experiment: str = "detkd"
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db")


class PipelineData(_Section):
    synth: SynthSpec | None = None
    train: SplitConfig | None = None
    val: SplitConfig | None = None
    test: SplitConfig | None = Field(None, description="held out: models are scored on it when it is given")


class ModelEntry(_Section):
    name: str
    settings: dict[str, Any] = Field(default_factory=dict, description="partial run config over the defaults")


class TuneStep(_Section):
    """A sweep inside a pipeline: its best configuration becomes a final student named ``name``.

    The space's target student must be a student of this pipeline (its ``target.pipeline``
    is replaced by this spec); the budget keys override the space's.
    """

    name: str
    space: Path
    samples: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    scheduler: Literal["asha", "fifo"] | None = None
    search: Literal["random", "grid", "optuna"] | None = None


class RegisterGate(_Section):
    """Promotion floors: AP on the pipeline's scoring split (test when it has one); deployed speed as
    :mod:`detkd.serving.speed` measures it, on the machine that registers, against ``speed.reference``."""

    min_gain: float = Field(0.0, description="candidate AP >= baseline AP + min_gain (negative: may trail it)")
    min_ap: float = Field(0.0, ge=0, le=1)
    min_speedup: float | None = Field(
        None, gt=0, description="deployed speedup over speed.reference >= min_speedup (ONNX Runtime, batch 1)"
    )
    max_latency_ms: float | None = Field(
        None, gt=0, description="deployed latency per image (ms, ONNX Runtime, batch 1) <= max_latency_ms"
    )
    speed: SpeedSettings = Field(
        default_factory=SpeedSettings,
        description="how the registered student's deployed speed is measured; reference: a model of this "
        "pipeline or a checkpoint (default: the student's teacher, else the pipeline's first teacher)",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_images_per_s(cls, data: Any) -> Any:
        if isinstance(data, dict) and "min_images_per_s" in data:
            raise ValueError(
                "min_images_per_s is gone (it read the evaluation's eager images/s): give min_speedup (deployed "
                "speedup over speed.reference) or max_latency_ms (deployed ms per image) instead"
            )
        return data

    @property
    def speed_floor(self) -> bool:
        """Whether the gate has a condition on deployed speed (which only a measurement can meet)."""
        return self.min_speedup is not None or self.max_latency_ms is not None


class RegisterStep(_Section):
    """Register ``student`` as a new version of ``model``; ``champion`` moves only if the gate passes
    and it beats the current champion on the same split, else the version is ``challenger``."""

    model: str = Field(min_length=1)
    student: str = Field(description="the student (or tune step) to register")
    baseline: str | None = Field(None, description="the student the gate's min_gain compares with")
    gate: RegisterGate = Field(default_factory=RegisterGate)


class PipelineSpec(_Section):
    name: str
    workdir: Path = Path("runs/pipeline")
    tracking: PipelineTracking = Field(default_factory=PipelineTracking)
    data: PipelineData
    defaults: dict[str, Any] = Field(default_factory=dict)
    teachers: list[ModelEntry] = Field(default_factory=list)
    students: list[ModelEntry] = Field(default_factory=list)
    tune: list[TuneStep] = Field(default_factory=list, description="sweeps whose best config is a final student")
    eval_batch_size: int = Field(8, ge=1)
    # spelled ``register`` in the YAML (the attribute name would shadow pydantic's BaseModel.register)
    registration: RegisterStep | None = Field(
        None, alias="register", description="register the chosen student in the MLflow registry"
    )


def read_pipeline(path: Path, overrides: list[str] | None = None) -> PipelineSpec:
    """The spec at ``path`` validated: its models, teachers, tracking and register sections (not its sweeps:
    :func:`detkd.pipeline.load.load_pipeline` checks those, which needs the sweeps package)."""
    data = apply_overrides(read_yaml(path), overrides or [])
    spec: PipelineSpec = validate_config(data, source=str(path), model=PipelineSpec)
    names = [e.name for e in spec.teachers + spec.students] + [t.name for t in spec.tune]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: model names must be unique, got {names}")
    if not names:
        raise ConfigError(f"{path}: teachers/students: the pipeline has no model to train")
    if spec.data.synth is None and spec.data.train is None:
        raise ConfigError(f"{path}: data: give synth settings or a train split")
    check_tracking_settings(spec, path)
    from detkd.engine.build import check_model_config
    from detkd.engine.plan import stage_configs

    known: list[str] = []
    for role, entries in (("teacher", spec.teachers), ("student", spec.students)):
        for i, entry in enumerate(entries):
            where = f"{path}: {role}s[{i}] ({entry.name})"
            cfg = model_config(spec, entry, role=role, source=where)
            check_model_config(cfg.model, where=where)
            if cfg.distill is not None:
                stages = stage_configs(cfg) if cfg.distill.stages else [cfg]
                for stage in stages:
                    for ref in stage.distill.teachers:
                        if ref.source is None:  # a backbone teacher: resolved (and checked) when its step plans
                            continue
                        if (
                            ref.source not in known
                            and not Path(ref.source).is_file()
                            and not Path(ref.source).is_dir()  # a transformers save_pretrained folder
                            and not ref.source.startswith(("mlflow:", "models:/"))
                        ):
                            raise ConfigError(
                                f"{where}: teacher {ref.source!r} is neither an earlier model of this "
                                f"pipeline ({known}), a checkpoint file or folder, mlflow:<run_id> nor "
                                "models:/NAME@ALIAS"
                            )
            known.append(entry.name)
    check_register(spec, path)
    return spec


def check_backbone_teachers(spec: PipelineSpec) -> None:
    """Every backbone teacher's folder is there before any step trains (its weights are checked when its step
    plans): a missing one is named with the command that makes it. Run time only: ``detkd plan`` and
    ``detkd models pretrain-vit --pipeline`` read the spec before the folder exists."""
    from detkd.models.vit_teacher import DINO_MODELS

    for role, entries in (("teacher", spec.teachers), ("student", spec.students)):
        for i, entry in enumerate(entries):
            distill = model_config(spec, entry, role=role).distill
            for ref in distill.teachers if distill is not None else []:  # a stage's teacher is never a backbone
                backbone = ref.backbone
                if backbone is None or backbone in DINO_MODELS or Path(backbone).expanduser().is_dir():
                    continue
                raise ConfigError(
                    f"{spec.name}: {role}s[{i}] ({entry.name}): backbone teacher {backbone!r}: no such folder; "
                    f"make it first with `detkd models pretrain-vit --pipeline <this pipeline> --out {backbone}` "
                    f"(or give a save_pretrained vision-transformer folder, or one of {sorted(DINO_MODELS)} from "
                    "the local Hugging Face cache)"
                )


def check_register(spec: PipelineSpec, path: Path) -> None:
    """The register step names models of this pipeline and has a split to score them on."""
    if spec.registration is None:
        return
    students = [e.name for e in spec.students] + [t.name for t in spec.tune]
    for key in ("student", "baseline"):
        name = getattr(spec.registration, key)
        if name is not None and name not in students:
            raise ConfigError(f"{path}: register.{key}: {name!r} is not a student of this pipeline ({students})")
    model = spec.registration.model
    if model.endswith(".registering") or any(c in model for c in "/@:"):
        raise ConfigError(f"{path}: register.model: {model!r} cannot be a registered model name")
    if data_splits(spec).scoring() is None:
        raise ConfigError(f"{path}: register: the pipeline has no val or test split to score the candidate on")
    reference = spec.registration.gate.speed.reference
    models = [e.name for e in spec.teachers] + students
    if (
        reference is not None
        and reference not in models
        and not reference.startswith(("mlflow:", "models:/"))
        and not Path(reference).expanduser().is_file()
    ):
        raise ConfigError(
            f"{path}: register.gate.speed.reference: {reference!r} is neither a model of this pipeline ({models}), "
            "a checkpoint file, mlflow:<run_id> nor models:/NAME@ALIAS"
        )


def check_tracking_settings(spec: PipelineSpec, path: Path) -> None:
    """Tracking URI and experiment have one source, the spec's ``tracking`` section."""
    places = [("defaults", spec.defaults)] + [(f"{e.name}.settings", e.settings) for e in spec.teachers + spec.students]
    for where, settings in places:
        for key in ("tracking_uri", "experiment"):
            if key in (settings.get("tracking") or {}):
                raise ConfigError(
                    f"{path}: {where}.tracking.{key}: set it once as tracking.{key} at the top of the pipeline "
                    "spec; it applies to the parent run and every child run"
                )


def tracking_context(spec: PipelineSpec, *, parent_run_id: str | None = None):
    from detkd.records import TrackingContext
    from detkd.tracking.runs import resolve_tracking_uri

    return TrackingContext(
        uri=resolve_tracking_uri(spec.tracking.tracking_uri),
        experiment=spec.tracking.experiment,
        parent_run_id=parent_run_id,
    )


class DataSplits(NamedTuple):
    train: SplitConfig
    val: SplitConfig | None
    test: SplitConfig | None

    def scoring(self) -> tuple[str, SplitConfig] | None:
        """The split a pipeline scores its models on: the held-out test split when there is one."""
        if self.test is not None:
            return "test", self.test
        return ("val", self.val) if self.val is not None else None


def data_splits(spec: PipelineSpec) -> DataSplits:
    if spec.data.synth is not None:
        root = spec.workdir / "data"

        def synthetic(split: str) -> SplitConfig:
            return SplitConfig(coco=root / f"annotations/instances_{split}.json", images=root / f"images/{split}")

        synth = spec.data.synth
        return DataSplits(
            train=synthetic("train"),
            val=synthetic("val") if synth.num_val else None,
            test=synthetic("test") if synth.test_images else None,
        )
    return DataSplits(train=spec.data.train, val=spec.data.val, test=spec.data.test)


def model_config(spec: PipelineSpec, entry: ModelEntry, *, role: str, source: str | None = None) -> Config:
    splits = data_splits(spec)
    base = {
        "data": {
            split: section.model_dump() if section is not None else None for split, section in splits._asdict().items()
        },
        "run": {"storage_path": str(spec.workdir / "ray"), "output_dir": str(spec.workdir / "models")},
        "tracking": {"experiment": spec.tracking.experiment, "tracking_uri": spec.tracking.tracking_uri},
    }
    merged = deep_merge(deep_merge(base, spec.defaults), entry.settings)
    merged.update(name=entry.name, role=role)
    return validate_config(merged, source=source or entry.name)


def ensure_synthetic_data(spec: PipelineSpec) -> dict[str, Any]:
    """Synthesize once per spec: a marker with the exact settings makes reruns reuse the data."""
    from detkd.data.synth import synthesize

    root = spec.workdir / "data"
    settings = spec.data.synth.model_dump(mode="json")
    marker = root / "synth.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return {"reused": True, **settings}
    summary = synthesize(root, spec.data.synth)
    marker.write_text(json.dumps(settings, sort_keys=True))
    return {"reused": False, **summary}
