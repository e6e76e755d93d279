"""Search spaces: the small typed YAML format of ``search_spaces/*.yaml``.

A space names what it varies (a pipeline's student entry, or a run config), the
parameters as dotted config keys mapped to one distribution each, and a default
budget. ``load_space`` checks every parameter against the target's config before a
trial starts and reports every problem at once, each naming the file and the key.

Plain Python + pydantic: no Ray, no MLflow (the Tune side is ``detkd.sweeps.tuner``).
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, model_validator

from detkd.config import (
    Config,
    ConfigError,
    _Section,
    load_config,
    read_yaml,
    validate_config,
)
from detkd.engine.plan import absolute_paths, stage_configs
from detkd.pipeline.spec import PipelineSpec, model_config, read_pipeline
from detkd.serving.speed import SpeedSettings
from detkd.sweeps.objectives import SPEED, Constraint, Objective, parse_constraint, parse_objectives

TEACHER_SEQUENCE = "teacher_sequence"
KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class SweepTarget(_Section):
    """What a sweep varies: a student entry of a pipeline spec, or a run config (paths relative to the cwd)."""

    pipeline: Path | None = None
    student: str | None = Field(None, description="the pipeline's student entry the trials vary")
    config: Path | None = Field(None, description="a run config the trials vary")

    @model_validator(mode="after")
    def _one_target(self) -> SweepTarget:
        if (self.pipeline is None) == (self.config is None):
            raise ValueError("give pipeline (with student) or config, not both")
        if self.pipeline is not None and not self.student:
            raise ValueError("a pipeline target needs student: the entry the trials vary")
        return self


class SweepBudget(_Section):
    """Defaults of ``detkd tune``'s options; the command line overrides each."""

    samples: int = Field(8, ge=1, description="trials drawn (random/optuna); repeats of the grid (grid)")
    max_concurrent: int = Field(2, ge=1)
    scheduler: Literal["asha", "fifo"] = "asha"
    search: Literal["random", "grid", "optuna"] = "random"
    sampler: Literal["tpe", "nsga2"] = Field(
        "tpe", description="optuna's sampler: (multi-objective) TPE or NSGA-II; both honour the constraints"
    )
    grace_epochs: int = Field(2, ge=1, description="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the best 1/reduction_factor at each rung")
    max_failures: int = Field(1, ge=0, description="retries of a failed trial (from its last checkpoint)")
    seed: int = Field(0, ge=0, description="seed of the search algorithm")


class SearchSpace(_Section):
    name: str
    description: str = ""
    target: SweepTarget
    metric: Literal["AP", "AP50", "AP75", "APs", "APm", "APl"] = Field(
        "AP", description="the validation metric trials are ranked by (val/<metric>)"
    )
    objectives: dict[str, str] | None = Field(
        None, description="several objectives, e.g. {AP: max, speedup: max} (instead of metric)"
    )
    constraints: dict[str, str] = Field(
        default_factory=dict, description='bounds a chosen trial must meet, e.g. {speedup: ">= 3.0"}'
    )
    speed: SpeedSettings = Field(
        default_factory=SpeedSettings, description="how each trial's deployed speed is measured, and against what"
    )
    parameters: dict[str, Any]
    budget: SweepBudget = Field(default_factory=SweepBudget)
    workdir: Path | None = Field(None, description="the sweep's folder; default <pipeline workdir>/sweeps/<name>")

    @model_validator(mode="after")
    def _metric_or_objectives(self) -> SearchSpace:
        if self.objectives is not None and "metric" in self.model_fields_set:
            raise ValueError("give metric (one objective) or objectives, not both")
        return self

    def objective_map(self) -> dict[str, str]:
        """The objectives as written: ``{metric: max}`` for a single-metric space."""
        return dict(self.objectives) if self.objectives is not None else {self.metric: "max"}


@dataclass(frozen=True)
class Parameter:
    """One parameter: ``choice``/``grid`` hold ``values``; the others ``low``/``high`` (and ``q``)."""

    name: str
    kind: str
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    q: float = 0.0

    @property
    def categorical(self) -> bool:
        return self.kind in ("choice", "grid")

    def labels(self) -> tuple[Any, ...]:
        """What Tune samples for a categorical parameter: scalars as they are, lists and mappings as YAML text."""
        return tuple(value_label(v) for v in self.values)

    def decode(self, sampled: Any) -> Any:
        """Tune's sample -> the YAML value it stands for."""
        if not self.categorical:
            return int(sampled) if self.kind == "randint" else float(sampled)
        for value in self.values:
            if value_label(value) == sampled:
                return copy.deepcopy(value)
        raise KeyError(f"{self.name}: {sampled!r} is none of the space's values")

    def probe_values(self) -> list[Any]:
        """The values checked against the config before a sweep starts: every choice, or both ends."""
        if self.categorical:
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


def value_label(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return value


@dataclass
class LoadedSpace:
    """A checked space with its target resolved: the base run config every trial starts from."""

    path: Path
    space: SearchSpace
    parameters: tuple[Parameter, ...]
    base: Config
    pipeline: PipelineSpec | None = None  # the target's pipeline, for a pipeline target
    teacher_names: tuple[str, ...] = ()  # teachers a trial may name (a pipeline's teacher entries)
    needed_teachers: tuple[str, ...] = field(default_factory=tuple)  # the pipeline teachers the trials use
    objectives: tuple[Objective, ...] = ()
    constraints: tuple[Constraint, ...] = ()

    @property
    def name(self) -> str:
        return self.space.name

    @property
    def metric_key(self) -> str:
        """The accuracy objective's key (``val/AP``): what ASHA stops on and the chosen trial is the best of."""
        return next(o.key for o in self.objectives if o.key.startswith("val/"))

    @property
    def needs_speed(self) -> bool:
        return any(x.name in SPEED for x in (*self.objectives, *self.constraints))

    def workdir(self) -> Path:
        if self.space.workdir is not None:
            return Path(self.space.workdir).resolve()
        root = Path(self.pipeline.workdir) if self.pipeline is not None else Path("runs")
        return (root / "sweeps" / self.space.name).resolve()


# --------------------------------------------------------------------------- parsing


def parse_parameter(name: str, spec: Any, *, where: str) -> tuple[Parameter | None, list[str]]:
    """One ``name: {kind: args}`` entry -> (Parameter, []) or (None, [errors])."""
    key = f"{where}: parameters.{name}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        return None, [f"{key}: give exactly one of {', '.join(KINDS)} (e.g. {{choice: [a, b]}}), found {spec!r}"]
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            return None, [f"{key}: {kind} needs a non-empty list of values"]
        labels = [value_label(v) for v in args]
        if len(set(map(repr, labels))) != len(labels):
            return None, [f"{key}: {kind} lists a value twice"]
        return Parameter(name=name, kind=kind, values=tuple(args)), []
    arity = 3 if kind == "quniform" else 2
    shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
    if not isinstance(args, list) or len(args) != arity or not all(_is_number(a) for a in args):
        return None, [f"{key}: {kind} needs {shape} numbers, found {args!r}"]
    low, high = float(args[0]), float(args[1])
    errors = []
    if low >= high:
        errors.append(f"{key}: {kind} needs low < high, found low {args[0]} >= high {args[1]}")
    if kind == "loguniform" and low <= 0:
        errors.append(f"{key}: loguniform needs low > 0, found {args[0]}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        errors.append(f"{key}: randint needs integers [low, high) (high excluded), found {args!r}")
    if kind == "quniform" and float(args[2]) <= 0:
        errors.append(f"{key}: quniform needs q > 0, found {args[2]}")
    if errors:
        return None, errors
    q = float(args[2]) if kind == "quniform" else 0.0
    return Parameter(name=name, kind=kind, low=low, high=high, q=q), []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_config_key(dotted: str, model: type[BaseModel] = Config) -> bool:
    """Whether ``a.b.c`` names a field of the run config (through optional sections)."""
    node: Any = model
    for part in dotted.split("."):
        node = _section_type(node)
        if node is None or part not in node.model_fields:
            return False
        node = node.model_fields[part].annotation
    return True


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


def settings_of(param: Parameter, value: Any) -> dict[str, Any]:
    """The dotted config keys a parameter's value sets (a mapping value of a group sets several)."""
    if param.name == TEACHER_SEQUENCE:
        return {}
    if is_config_key(param.name):
        return {param.name: value}
    return dict(value)  # a group: checked by check_parameter to be a mapping of config keys


# --------------------------------------------------------------------------- trial configs


def trial_settings(
    base: Config, parameters: tuple[Parameter, ...], values: dict[str, Any]
) -> tuple[dict[str, Any], list[str] | None]:
    """(dotted settings, teacher sequence or None) of one trial's decoded ``values``."""
    settings: dict[str, Any] = {}
    sequence = None
    for param in parameters:
        if param.name not in values:
            continue
        if param.name == TEACHER_SEQUENCE:
            sequence = list(values[param.name])
        else:
            settings.update(settings_of(param, values[param.name]))
    return settings, sequence


def apply_trial(base: Config, settings: dict[str, Any], sequence: list[str] | None, *, source: str) -> Config:
    """The run config of one trial: ``base`` with ``settings`` set, its teachers replaced by ``sequence``.

    When ``input.scale`` changes and the levels are not set, the pyramid follows the scale;
    a teacher sequence of one name is single-teacher distillation, of several the
    progressive stages in that order, splitting the student's epochs evenly (equal budget).
    """
    data = base.model_dump(mode="json")
    for key, value in settings.items():
        set_dotted(data, key, value)
    scale = settings.get("input.scale")
    if _is_number(scale) and scale > 0 and not {"model.min_level", "model.max_level"} & set(settings):
        data["model"]["min_level"], data["model"]["max_level"] = levels_for_scale(base, float(scale))
    if sequence is not None:
        data["distill"] = teacher_sequence_section(base, data.get("distill"), sequence)
    return validate_config(data, source=source)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``a.b.c``, creating missing (or null) sections."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)


def levels_for_scale(base: Config, scale: float) -> tuple[int, int]:
    """Pyramid levels of a student at ``scale``: the base's levels, brought back to scale 1, shifted by
    round(log2(1/scale)) — the exact 2^k shift for 0.5, 0.25; the nearest one otherwise (the
    distillation then pairs levels by footprint and resizes). Clamped to P2-P7."""
    own_shift = round(math.log2(1.0 / base.input.scale))
    ref_min, ref_max = base.model.min_level + own_shift, base.model.max_level + own_shift
    shift = round(math.log2(1.0 / scale))
    low = min(7, max(2, ref_min - shift))
    high = min(7, max(low, ref_max - shift))
    return low, high


def teacher_sequence_section(base: Config, distill: dict[str, Any] | None, sequence: list[str]) -> dict[str, Any]:
    """The distill section for a teacher sequence: the base's methods, teachers from the sequence."""
    if not distill or not base.distill or not base.distill.methods():
        raise ConfigError(
            f"{TEACHER_SEQUENCE}: the target student distils with no method (distill.mgd, distill.ssim, ...)"
        )
    section = {k: v for k, v in distill.items() if k not in ("teachers", "stages")}
    if len(sequence) == 1:
        section["teachers"] = [{"source": sequence[0]}]
        section["stages"] = []
        return section
    epochs = student_epochs(base)
    per_stage = [epochs // len(sequence) + (1 if k < epochs % len(sequence) else 0) for k in range(len(sequence))]
    if min(per_stage) < 1:
        raise ConfigError(f"{TEACHER_SEQUENCE}: {len(sequence)} stages need at least {len(sequence)} epochs")
    section["teachers"] = []
    section["stages"] = [
        {"teacher": {"source": name}, "settings": {"train": {"epochs": n}}}
        for name, n in zip(sequence, per_stage, strict=True)
    ]
    return section


def stage_epochs(cfg: Config) -> list[int]:
    """Epochs of each run a config makes: one entry, or one per progressive stage."""
    if cfg.distill is not None and cfg.distill.stages:
        return [stage.train.epochs for stage in stage_configs(cfg)]
    return [cfg.train.epochs]


def student_epochs(cfg: Config) -> int:
    """The student's whole budget in epochs: its stages' sum when it is progressive."""
    return sum(stage_epochs(cfg))


# --------------------------------------------------------------------------- loading


def load_space(path: Path, *, pipeline: PipelineSpec | None = None) -> LoadedSpace:
    """Read and check a space file; ``pipeline`` (a PipelineSpec) replaces a pipeline target's file.

    Raises ConfigError with one line per problem, each naming the file and the key.
    """
    path = Path(path)
    where = str(path)
    space: SearchSpace = validate_config(read_yaml(path), source=where, model=SearchSpace)
    if not space.parameters:
        raise ConfigError(f"{where}: parameters: the space varies nothing")
    base, spec, teachers = target_config(space, where=where, pipeline=pipeline)
    base = absolute_paths(base)  # trials run in Tune's trial folders (and on other nodes), not in this cwd
    errors: list[str] = []
    parameters: list[Parameter] = []
    for name, raw in space.parameters.items():
        param, problems = parse_parameter(name, raw, where=where)
        errors += problems
        if param is not None:
            problems = check_parameter(param, base, teacher_names=teachers, where=where)
            errors += problems
            if not problems:
                parameters.append(param)
    objectives, problems = parse_objectives(space.objective_map(), where=where)
    errors += problems
    constraints: list[Constraint] = []
    for name, text in space.constraints.items():
        constraint, problems = parse_constraint(name, text, where=where)
        errors += problems
        if constraint is not None:
            constraints.append(constraint)
    errors += check_reference(space, base, parameters, teacher_names=teachers, where=where)
    if errors:
        raise ConfigError("\n".join(errors))
    used = used_teachers(base, parameters) + ([space.speed.reference] if space.speed.reference else [])
    needed = tuple(sorted(set(used) & set(teachers)))
    return LoadedSpace(
        path=path.resolve(),
        space=space,
        parameters=tuple(parameters),
        base=base,
        pipeline=spec,
        teacher_names=teachers,
        needed_teachers=needed,
        objectives=tuple(objectives),
        constraints=tuple(constraints),
    )


def check_reference(
    space: SearchSpace, base: Config, parameters: list[Parameter], *, teacher_names: tuple[str, ...], where: str
) -> list[str]:
    """A named speed reference must be a pipeline teacher or a checkpoint file; a space that objects or constrains
    speed needs a reference for every trial (the named one, or each trial's teacher)."""
    reference = space.speed.reference
    if reference is not None:
        if reference not in teacher_names and not Path(reference).is_file():
            return [
                f"{where}: speed.reference: {reference!r} is neither a teacher of the target pipeline "
                f"({list(teacher_names)}) nor a checkpoint file"
            ]
        return []
    speed_used = [x for x in (*space.objective_map(), *space.constraints) if x in SPEED]
    distills = base.distill is not None and (base.distill.teachers or base.distill.stages)
    if speed_used and not distills and not any(p.name == TEACHER_SEQUENCE for p in parameters):
        return [
            f"{where}: speed.reference: {', '.join(speed_used)} is measured against a reference model, and the "
            "target student distils from no teacher: name one (a pipeline teacher or a checkpoint file)"
        ]
    return []


def target_config(
    space: SearchSpace, *, where: str, pipeline: PipelineSpec | None = None
) -> tuple[Config, PipelineSpec | None, tuple[str, ...]]:
    """(the target student's run config, the pipeline spec or None, the pipeline's teacher names)."""
    target = space.target
    if target.config is not None:
        return load_config(target.config), None, ()
    spec = pipeline if pipeline is not None else read_pipeline(target.pipeline)
    entries = {e.name: e for e in spec.students}
    if target.student not in entries:
        raise ConfigError(
            f"{where}: target.student: {target.student!r} is not a student of pipeline {spec.name} "
            f"(students: {sorted(entries)})"
        )
    cfg = model_config(spec, entries[target.student], role="student", source=f"{where}: target.student")
    return cfg, spec, tuple(e.name for e in spec.teachers)


def check_parameter(param: Parameter, base: Config, *, teacher_names: tuple[str, ...], where: str) -> list[str]:
    """Every problem of one parameter against the target config (empty when it is sound)."""
    from detkd.engine.build import check_model_config

    key = f"{where}: parameters.{param.name}"
    if param.name == TEACHER_SEQUENCE:
        return check_teacher_sequence(param, base, teacher_names=teacher_names, key=key)
    grouped = not is_config_key(param.name)
    if grouped:
        if not param.categorical or not all(isinstance(v, dict) and v for v in param.values):
            return [
                f"{key}: unknown config key (a parameter is a dotted run-config key such as optim.lr, "
                f"{TEACHER_SEQUENCE}, or a name whose choice values are mappings of config keys)"
            ]
        bad = sorted({k for v in param.values for k in v if not is_config_key(str(k))})
        if bad:
            return [f"{key}: unknown config key(s) {', '.join(map(str, bad))} in its values"]
    errors: list[str] = []
    for value in param.probe_values():
        source = f"{key}: value {value_label(value)!r}"
        try:
            cfg = apply_trial(base, settings_of(param, value), None, source=source)
            check_model_config(cfg.model, where=source)
        except ConfigError as exc:
            errors += str(exc).splitlines()
    return errors


def check_teacher_sequence(param: Parameter, base: Config, *, teacher_names: tuple[str, ...], key: str) -> list[str]:
    if not param.categorical:
        return [f"{key}: a teacher sequence is a choice or grid of lists of teacher names"]
    errors = []
    for value in param.values:
        if not isinstance(value, list) or not value or not all(isinstance(n, str) for n in value):
            errors.append(f"{key}: {value!r} is not a non-empty list of teacher names")
            continue
        for name in value:
            known = name in teacher_names or Path(name).is_file() or name.startswith(("mlflow:", "models:/"))
            if not known:
                errors.append(
                    f"{key}: unknown teacher {name!r} (teachers of the target pipeline: {list(teacher_names)}; "
                    "or a checkpoint file, mlflow:<run_id> or models:/NAME@ALIAS)"
                )
        try:
            apply_trial(base, {}, value, source=key)
        except ConfigError as exc:
            errors.append(f"{key}: {exc}")
    return errors


def used_teachers(base: Config, parameters: list[Parameter]) -> list[str]:
    """Every teacher name a trial can use: the target's own and all in a teacher sequence."""
    names: list[str] = []
    if base.distill is not None:
        names += [t.label for t in base.distill.teachers] + [s.teacher.label for s in base.distill.stages]
    for param in parameters:
        if param.name == TEACHER_SEQUENCE:
            names += [n for value in param.values for n in value]
    return names


def design_label(cfg: Config) -> str:
    """A trial's student in a few words, for plots and tables: ``lite tiny 64px fpn64 h2 P2-P4 ssim``."""
    model = cfg.model
    px = int(round(cfg.input.size * cfg.input.scale))
    methods = cfg.distill.method_name if cfg.distill is not None else "no KD"
    if model.arch == "mmdet":
        return f"mmdet {Path(str(model.mmdet_config)).stem} {px}px {methods}"
    return (
        f"{model.design} {model.backbone} {px}px fpn{model.fpn_channels} h{model.head_convs} "
        f"P{model.min_level}-P{model.max_level} {methods}"
    )
