"""The plan of one training run, built once on the driver before Ray starts.

A :class:`~detkd.records.RunPlan` holds everything that decides what a run does: the validated
config (absolute paths), its digest, the resolved teachers, the input view and the
tracking context. The launcher, the Ray worker, the checkpoint and ``detkd evaluate``
all read the same plan, and every checkpoint stores it, so a model file says how it
was trained and how it must be fed. Building a plan also builds the model (and the
distiller) on the meta device: a config that cannot be carried out fails here with a
:class:`ConfigError`, not inside a retried Ray worker.

Plain Python + PyTorch: importable and testable without Ray or MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from detkd.config import Config, ConfigError, ScaleJitterConfig, SplitConfig, deep_merge, validate_config
from detkd.config import absolute_paths as config_absolute_paths
from detkd.data.records import DetectionSource
from detkd.models.checkpoint import file_digest
from detkd.records import InputSpec, RunPlan, TeacherSpec, TrackingContext

log = logging.getLogger("detkd.train")


def input_spec(cfg: Config) -> InputSpec:
    from detkd.models.detectors import IMAGENET_MEAN, IMAGENET_STD

    return InputSpec(
        size=cfg.input.size,
        max_size=cfg.input.max_size,
        scale=cfg.input.scale,
        mean=tuple(IMAGENET_MEAN),
        std=tuple(IMAGENET_STD),
    )


logger = logging.getLogger(__name__)

# MSAD trains its multi-scale teacher with multi-scale input: short sides 640..800 for 800 (detectron2's
# ResizeShortestEdge), i.e. [0.8 x size, size].
MULTISCALE_SHORT_SIDE = 0.8


def resolve_augment(cfg: Config) -> Config:
    """``cfg`` with the augmentation training will use: the one place where defaults depend on the model.

    An MSAD multi-scale teacher (``model.multiscale``) without an explicit ``input.augment.scale_jitter``
    trains with short sides drawn from [round(0.8 x input.size), input.size], as in its paper; an
    explicit ``scale_jitter`` wins. The result is what the plan stores and the digest covers.
    """
    augment = cfg.input.augment
    if not cfg.model.multiscale or augment.scale_jitter is not None:
        return cfg
    jitter = ScaleJitterConfig(short_side=(round(MULTISCALE_SHORT_SIDE * cfg.input.size), cfg.input.size))
    logger.info(
        "%s: MSAD multi-scale teacher: training short side jittered in [%d, %d] px "
        "(input.augment.scale_jitter, set it to choose another range)",
        cfg.name,
        *jitter.short_side,
    )
    augment = augment.model_copy(update={"scale_jitter": jitter})
    return cfg.model_copy(update={"input": cfg.input.model_copy(update={"augment": augment})})


def absolute_paths(cfg: Config, base: Path | None = None) -> Config:
    """Ray workers do not share the driver's cwd: make every path field absolute (URIs are left as given)."""
    return config_absolute_paths(cfg, Path(base or Path.cwd()))


# Bump when what enters the digest changes: runs planned by older code then start in new Ray run folders
# instead of resuming. 2: every model field enters as it is (1 left out design "standard" and mmdet_config).
# 3: the model settings of torchvision's detectors (norm_eps, top_levels, fpn_norm, ...) and trainable_layers.
DIGEST_VERSION = 3


def config_digest(cfg: Config, teachers: tuple[TeacherSpec, ...]) -> str:
    """Digest of what changes the trained weights (not where results go or how they are logged).

    Teachers and initial weights enter by content, so a retrained teacher (or a retrained
    previous progressive stage) never silently resumes a student trained from its predecessor;
    an MMDetection config enters by its resolved ``model`` section.
    """
    data = cfg.model_dump(mode="json", exclude={"run": True, "tracking": True, "name": True, "eval": True})
    data["digest_version"] = DIGEST_VERSION
    data["data"].pop("test", None)  # held out: never read by training
    for section in (data["data"]["train"], data["data"]["val"]):  # formats added later enter only when used,
        for key in ("yolo", "voc", "split", "classes"):  # so a COCO or Parquet run keeps its digest
            if section is not None and section.get(key) is None:
                section.pop(key, None)
    data["train"].pop("log_every", None)
    # input.augment enters as digests before it existed had it (input.hflip), plus the ops that are on:
    # a config without augmentation ops keeps its digest, and so its Ray run folder.
    augment = data["input"].pop("augment")
    data["input"]["hflip"] = augment.pop("hflip")
    if ops := {k: v for k, v in augment.items() if v is not None}:
        data["input"]["augment"] = ops
    for key in ("weights", "backbone_weights"):
        value = data["model"].pop(key)
        data["model"][f"{key}_sha256"] = file_digest(Path(value)) if value and Path(value).is_file() else value
    mmdet_config = data["model"].pop("mmdet_config")
    data["model"]["mmdet_model_sha256"] = None
    if mmdet_config:
        from detkd.models.mmdet_detector import model_section_digest

        try:  # the resolved model section: a change in a `_base_` file changes the run, a comment does not
            data["model"]["mmdet_model_sha256"] = model_section_digest(Path(mmdet_config))
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"model.mmdet_config: {exc}") from None
    hf_model = data["model"].pop("hf_model")  # enters only when set: earlier configs keep their digests
    if hf_model:
        data["model"]["hf_model_sha256"] = hf_model_digest(Path(hf_model))
    if data["model"]["hf_canvas"] is None:  # likewise (None: the input view's largest side, in the digest already)
        data["model"].pop("hf_canvas")
    data["teachers"] = [[t.sha256, t.scale] for t in teachers]
    if data.get("distill"):
        data["distill"] = {k: v for k, v in data["distill"].items() if k != "teachers"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def hf_model_digest(path: Path) -> str:
    """A transformers model by content: its config, and its weights when the folder has them."""
    from detkd.models.hf_detector import CONFIG_FILE, weights_file

    config = path / CONFIG_FILE if path.is_dir() else path
    if not config.is_file():
        raise ConfigError(f"model.hf_model: {path}: no {CONFIG_FILE} (a save_pretrained folder holds one)")
    weights = weights_file(path)
    return file_digest(config) + (f"+{file_digest(weights)}" if weights else "")


def open_split(split: SplitConfig, *, skip_invalid: bool) -> DetectionSource:
    from detkd.data import open_source

    return open_source(
        coco=split.coco,
        images=split.images,
        parquet=split.parquet,
        yolo=split.yolo,
        voc=split.voc,
        split=split.split,
        classes=split.classes,
        skip_invalid=skip_invalid,
    )


def open_sources(cfg: Config) -> dict[str, DetectionSource]:
    """The config's splits ("train", and "val" when given), read and validated."""
    return {
        split: open_split(section, skip_invalid=cfg.data.skip_invalid)
        for split in ("train", "val")
        if (section := getattr(cfg.data, split)) is not None
    }


def build_plan(
    cfg: Config,
    *,
    tracking: TrackingContext,
    teacher_names: dict[str, Path] | None = None,
    sources: dict[str, DetectionSource] | None = None,
    where: str | None = None,
    check_weights: bool = True,
) -> RunPlan:
    """Validate ``cfg`` against its data, teachers, model and weight files and return the run's plan.

    ``teacher_names`` maps pipeline model names to their checkpoints; ``sources`` are the
    splits if the caller already opened them (``open_sources``). Raises ConfigError (or
    the data's DatasetError) naming ``where`` (default: the run name). ``check_weights=False``
    leaves ``model.weights`` unread (a later progressive stage starts from weights not yet trained).
    """
    from detkd.engine.teachers import resolve_teachers

    where = where or cfg.name
    if cfg.distill is not None and cfg.distill.stages:
        raise ConfigError(f"{where}: distill.stages: plan each stage with stage_configs() first")
    cfg = resolve_augment(absolute_paths(cfg))
    if cfg.data.train is None:
        raise ConfigError(f"{where}: data.train: the config has no training split")
    train = (sources if sources is not None else open_sources(cfg))["train"]
    categories = tuple((c.id, c.name) for c in train.sorted_categories)
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(categories):
        raise ConfigError(
            f"{where}: model.num_classes: {cfg.model.num_classes}, "
            f"but the training data has {len(categories)} categories"
        )
    global_batch = cfg.train.batch_size * cfg.scaling.num_workers
    if len(train.records) < global_batch:
        raise ConfigError(
            f"{where}: train.batch_size: {cfg.train.batch_size} per worker x {cfg.scaling.num_workers} workers "
            f"needs at least {global_batch} training images, the data has {len(train.records)}"
        )
    num_classes = cfg.model.num_classes or len(categories)
    teachers = resolve_teachers(
        cfg, num_classes=num_classes, names=teacher_names, tracking_uri=tracking.uri, where=where
    )
    plan = RunPlan(
        config=cfg,
        digest=config_digest(cfg, teachers),
        teachers=teachers,
        input=input_spec(cfg),
        tracking=tracking,
        categories=categories,
    )
    check_buildable(plan, where=where, weights=check_weights)
    return plan


def stage_configs(cfg: Config) -> list[Config]:
    """Expand ``distill.stages`` into one run config per stage (stage k starts from stage k-1)."""
    base = cfg.model_dump(mode="json")
    stages = base["distill"].pop("stages")
    base_distill = {k: v for k, v in base.pop("distill").items() if k != "teachers"}
    out = []
    for k, stage in enumerate(stages, start=1):
        data = deep_merge({**base, "distill": base_distill}, stage["settings"])
        data["distill"]["teachers"] = [stage["teacher"]]
        data["name"] = f"{cfg.name}-stage{k}"
        if k > 1:
            data["distill"]["copy_neck_head"] = False  # only the first stage may copy the teacher's neck/head
            data["distill"]["init_from_teacher"] = False
        out.append(validate_config(data, source=f"{cfg.name}: distill.stages[{k - 1}]"))
    return out


def plan_stages(
    cfg: Config,
    *,
    tracking: TrackingContext,
    teacher_names: dict[str, Path] | None = None,
    sources: dict[str, DetectionSource] | None = None,
) -> list[RunPlan]:
    """Validate every progressive stage before training any (stage k > 1 planned without its start weights).

    ``sources`` (the splits of ``cfg``) are read once and shared by the stages that keep ``cfg``'s data.
    """
    sources = sources if sources is not None else open_sources(cfg)
    return [
        build_plan(
            stage,
            tracking=tracking,
            teacher_names=teacher_names,
            sources=sources if stage.data == cfg.data else None,
            where=f"{cfg.name}: distill.stages[{k}]",
            check_weights=k == 0,  # stage k > 0 starts from stage k - 1's student
        )
        for k, stage in enumerate(stage_configs(cfg))
    ]


def check_buildable(plan: RunPlan, *, where: str, weights: bool = True) -> None:
    """Build the trainable module on the meta device: every construction error becomes a ConfigError;
    with ``weights``, the weight files are matched against it too (:func:`check_weight_files`)."""
    from detkd.engine.build import build_trainable, check_weight_files

    try:
        _, student = build_trainable(plan, device="meta")
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where}: the model cannot be built from this config: {message}") from exc
    if weights:
        check_weight_files(plan.config.model, student, where=where)
