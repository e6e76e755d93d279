"""Resolve teacher references to checkpoint files on the driver, before any worker starts.

A reference is a checkpoint path, ``mlflow:<run_id>`` (the run's ``checkpoint/model.pt``
artifact), a registered model ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (pinned to
the version the alias points at now), or — inside a pipeline — the name of a model trained
earlier in it.
"""

from __future__ import annotations

from pathlib import Path

from detkd.config import Config, ConfigError, TeacherRef
from detkd.models.checkpoint import CheckpointError, file_digest, read_checkpoint_meta, refuse_unknown_head_groups
from detkd.records import CheckpointMeta, TeacherSpec


def resolve_source(
    source: str, *, names: dict[str, Path] | None = None, cache_dir: Path, tracking_uri: str | None = None
) -> Path:
    if names and source in names:
        return Path(names[source])
    if source.startswith("models:/"):
        from detkd.tracking.registry import registered_checkpoint
        from detkd.tracking.runs import resolve_tracking_uri

        path, _ = registered_checkpoint(source, tracking_uri=resolve_tracking_uri(tracking_uri), cache_dir=cache_dir)
        return path
    if source.startswith("mlflow:"):
        from detkd.tracking.runs import download_checkpoint

        return download_checkpoint(
            run_id=source.removeprefix("mlflow:"),
            tracking_uri=tracking_uri,
            dest=cache_dir / source.removeprefix("mlflow:"),
        )
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve()
    known = f"; pipeline models: {sorted(names)}" if names else ""
    raise ConfigError(
        f"teacher {source!r}: no such checkpoint file, pipeline model, mlflow:<run_id> or models:/NAME@ALIAS{known}"
    )


def resolve_teachers(
    cfg: Config,
    *,
    num_classes: int,
    names: dict[str, Path] | None = None,
    tracking_uri: str | None = None,
    where: str,
) -> tuple[TeacherSpec, ...]:
    """One :class:`TeacherSpec` per ``cfg.distill.teachers`` entry (checksums verified)."""
    if cfg.distill is None:
        return ()
    cache_dir = Path(cfg.run.output_dir) / ".teachers"
    out = []
    for i, ref in enumerate(cfg.distill.teachers):
        key = f"{where}: distill.teachers[{i}]"
        if ref.mmdet_config is not None:
            out.append(resolve_mmdet_teacher(ref, num_classes=num_classes, where=key))
            continue
        if ref.backbone is not None:
            out.append(resolve_backbone_teacher(ref, where=key))
            continue
        if is_hf_folder(ref.source):
            out.append(resolve_hf_teacher(ref, num_classes=num_classes, where=key))
            continue
        try:
            path = resolve_source(ref.source, names=names, cache_dir=cache_dir, tracking_uri=tracking_uri)
            meta = read_checkpoint_meta(path)
            refuse_unknown_head_groups(meta, path=path)  # now, not in a worker
        except (ConfigError, CheckpointError) as exc:
            raise ConfigError(f"{key}: {exc}") from None
        out.append(
            TeacherSpec(
                source=ref.source,
                path=str(path),
                scale=teacher_scale(ref, meta, cfg, num_classes, path=path, where=key),
                sha256=file_digest(path),
                name=str(meta.name if meta.name is not None else path.parent.name),
                model=dict(meta.model),
                mlflow_run_id=meta.mlflow_run_id,
            )
        )
    return tuple(out)


def resolve_mmdet_teacher(ref: TeacherRef, *, num_classes: int, where: str) -> TeacherSpec:
    """An MMDetection checkpoint (``ref.source``) for the model of ``ref.mmdet_config``, checked now.

    The weights are loaded into the config's network on the driver, so a checkpoint that
    does not fit its config is refused before any worker starts, naming both files. The
    teacher sees the reference view (``input_scale`` 1) unless the reference says otherwise.
    """
    from detkd.models.checkpoint import load_teacher
    from detkd.models.mmdet_detector import config_classes, read_mmdet_config

    config_file = Path(ref.mmdet_config).expanduser().resolve()
    path = Path(ref.source).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: MMDetection checkpoint {path} not found (for config {config_file})")
    try:
        config = read_mmdet_config(config_file)
        classes = config_classes(config)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"{where}.mmdet_config: {exc}") from None
    if classes != num_classes:
        raise ConfigError(
            f"{where}: MMDetection config {config_file} predicts {classes} classes, the training data has "
            f"{num_classes}; a teacher must share the student's label space"
        )
    model = dict(arch="mmdet", num_classes=classes, mmdet_config=config, config_file=str(config_file))
    try:
        load_teacher(path, model)
    except (CheckpointError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return local_teacher_spec(ref, path=path, weights=path, name=path.stem, model=model)


def local_teacher_spec(ref: TeacherRef, *, path: Path, weights: Path, name: str, model: dict) -> TeacherSpec:
    """A teacher read from local files of another framework (MMDetection, transformers): known by its weights'
    digest, seeing the reference view unless ``input_scale`` says otherwise."""
    return TeacherSpec(
        source=ref.source if ref.source is not None else str(ref.backbone),
        path=str(path),
        scale=float(ref.input_scale) if ref.input_scale is not None else 1.0,
        sha256=file_digest(weights),
        name=name,
        model=model,
        mlflow_run_id=None,
    )


def resolve_backbone_teacher(ref: TeacherRef, *, where: str) -> TeacherSpec:
    """A vision transformer that teaches features (``ref.backbone``: a folder, or dinov2/dinov3 from the local
    Hugging Face cache), its weights loaded and checked on the driver now."""
    from detkd.models.checkpoint import load_teacher
    from detkd.models.vit_teacher import WEIGHTS_FILE, backbone_folder, read_vit_config

    try:
        folder = backbone_folder(str(ref.backbone))
        config = read_vit_config(folder)
        model = load_teacher(
            folder, dict(arch="vit", hf_config=config, layers=list(ref.layers or [-1]), source=str(folder))
        )
    except (CheckpointError, ValueError) as exc:
        raise ConfigError(f"{where}.backbone: {exc}") from None
    return local_teacher_spec(
        ref, path=folder, weights=folder / WEIGHTS_FILE, name=folder.name, model=dict(model.detkd_config)
    )


def is_hf_folder(source: str) -> bool:
    """A transformers ``save_pretrained`` folder (a directory with a ``config.json``)."""
    from detkd.models.hf_detector import CONFIG_FILE

    path = Path(source).expanduser()
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def resolve_hf_teacher(ref: TeacherRef, *, num_classes: int, where: str) -> TeacherSpec:
    """A transformers detector's ``save_pretrained`` folder (``ref.source``), checked now.

    Its weights are loaded into the network its config describes on the driver, every tensor
    checked, so a folder whose weights and config disagree (or that predicts other classes) is
    refused before any worker starts. It sees the reference view unless ``input_scale`` says
    otherwise; its config is stored with the run, so the run's records rebuild it without the folder.
    """
    from detkd.models.checkpoint import load_teacher
    from detkd.models.hf_detector import config_classes, read_hf_config, weights_file

    folder = Path(ref.source).expanduser().resolve()
    try:
        config = read_hf_config(folder)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    weights = weights_file(folder)
    if weights is None:
        raise ConfigError(f"{where}: {folder}: no model.safetensors; a teacher needs trained weights")
    classes = config_classes(config)
    if classes != num_classes:
        raise ConfigError(
            f"{where}: {folder} predicts {classes} classes, the training data has {num_classes}; a teacher "
            "must share the student's label space (fine-tune it on these classes first: model.arch hf)"
        )
    try:
        model = load_teacher(folder, dict(arch="hf", num_classes=classes, hf_config=config, source=str(folder)))
    except (CheckpointError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return local_teacher_spec(ref, path=folder, weights=weights, name=folder.name, model=dict(model.detkd_config))


def teacher_scale(
    ref: TeacherRef, meta: CheckpointMeta, cfg: Config, num_classes: int, *, path: Path, where: str
) -> float:
    """The teacher's input size relative to the student's reference view (``input.size``)."""
    if meta.num_classes != num_classes:
        raise ConfigError(f"{where}: teacher {path} has {meta.num_classes} classes, the student {num_classes}")
    if ref.input_scale is not None:
        return float(ref.input_scale)
    plan = meta.plan
    if not plan:
        raise ConfigError(f"{where}: {path} records no run plan (input size); set {where}.input_scale")
    spec = plan["input"]
    return float(spec["size"]) * float(spec["scale"]) / cfg.input.size
