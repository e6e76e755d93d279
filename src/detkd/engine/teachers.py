"""Resolve teacher references to checkpoint files on the driver, before any worker starts.

A reference is a checkpoint path, ``mlflow:<run_id>`` (the run's ``checkpoint/model.pt``
artifact), or — inside a pipeline — the name of a model trained earlier in it.
"""

from __future__ import annotations

from pathlib import Path

from detkd.config import Config, ConfigError, TeacherRef
from detkd.models.checkpoint import read_detector_payload


def resolve_source(
    source: str, *, names: dict[str, Path] | None = None, cache_dir: Path, tracking_uri: str | None = None
) -> Path:
    if names and source in names:
        return names[source]
    if source.startswith("mlflow:"):
        from detkd.tracking import download_checkpoint

        return download_checkpoint(
            run_id=source.removeprefix("mlflow:"),
            tracking_uri=tracking_uri,
            dest=cache_dir / source.removeprefix("mlflow:"),
        )
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve()
    known = f"; pipeline models: {sorted(names)}" if names else ""
    raise ConfigError(f"teacher {source!r}: no such checkpoint file, pipeline model or mlflow:<run_id>{known}")


def resolve_teachers(
    cfg: Config, *, names: dict[str, Path] | None = None, cache_dir: Path, tracking_uri: str | None = None
) -> list[tuple[str, float]]:
    """[(absolute checkpoint path, input scale vs the reference view)] for ``cfg.distill.teachers``."""
    if cfg.distill is None:
        return []
    out = []
    for i, ref in enumerate(cfg.distill.teachers):
        path = resolve_source(ref.source, names=names, cache_dir=cache_dir, tracking_uri=tracking_uri)
        out.append((str(path), teacher_scale(ref, path, cfg, where=f"distill.teachers[{i}]")))
    return out


def teacher_scale(ref: TeacherRef, path: Path, cfg: Config, *, where: str) -> float:
    payload = read_detector_payload(path)
    meta = payload.get("meta", {})
    classes = payload["model"]["num_classes"]
    if cfg.model.num_classes is not None and classes != cfg.model.num_classes:
        raise ConfigError(f"{where}: teacher {path} has {classes} classes, the student {cfg.model.num_classes}")
    if ref.input_scale is not None:
        return float(ref.input_scale)
    size = meta.get("input_size")
    if not size:
        raise ConfigError(f"{where}: {path} records no input size; set {where}.input_scale")
    return float(size) / cfg.input.size
