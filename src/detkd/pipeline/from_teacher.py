"""``detkd distill --teacher MODEL --data DATA``: a distillation pipeline written from a teacher and a dataset.

For users who do not want to write YAML first. The teacher's checkpoint says its classes,
input size and pyramid; the data's format is read off the path (a YOLO ``data.yaml``, a
Pascal VOC folder, or a COCO JSON with its images folder); the student is a named preset.
The result is an ordinary pipeline spec (the distilled student and, unless asked not to,
its undistilled baseline, both scored on the held-out split) written to ``OUT/pipeline.yaml``
with each student's full run config beside it (``OUT/configs/<student>.yaml``), so the next
run can be ``detkd run OUT/pipeline.yaml`` or ``detkd distill OUT/configs/<student>.yaml``.
No Ray, no MLflow here: the CLI runs the spec with the pipeline runner.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detkd.config import METHOD_ORDER, ConfigError, apply_overrides, read_yaml
from detkd.models.checkpoint import CheckpointError, atomic_write_bytes, read_checkpoint_meta
from detkd.models.multiscale import level_shift
from detkd.pipeline.spec import ModelEntry, PipelineSpec, model_config, read_pipeline
from detkd.records import CheckpointMeta

log = logging.getLogger("detkd.pipeline")

# --student NAME -> the student's model section (FCOS: every distillation method applies to it).
STUDENTS: dict[str, dict[str, Any]] = {
    "lite": {"arch": "fcos", "backbone": "tiny", "design": "lite", "fpn_channels": 64, "head_convs": 2},
    "tiny": {"arch": "fcos", "backbone": "tiny", "fpn_channels": 64, "head_convs": 2},
    "mobilenet_v3_small": {"arch": "fcos", "backbone": "mobilenet_v3_small", "fpn_channels": 64, "head_convs": 2},
    "mobilenet_v3_large": {"arch": "fcos", "backbone": "mobilenet_v3_large", "fpn_channels": 96, "head_convs": 2},
    "resnet18": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 128, "head_convs": 3},
}
HOLDOUT_EVERY = 5  # a COCO file given alone: every 5th image (20 %) is held out to score the students on


@dataclass(frozen=True)
class DistillRequest:
    """What ``detkd distill --teacher ... --data ...`` was asked for."""

    teacher: str  # checkpoint file, models:/NAME@ALIAS, mlflow:<run_id> or PIPELINE.yaml:MODEL
    data: Path  # data.yaml (YOLO), a VOC folder, or a COCO JSON (with images)
    images: Path | None = None
    val: Path | None = None  # COCO only: a validation JSON (default: hold out 20 % of data)
    val_images: Path | None = None
    student: str = "lite"
    scale: float = 0.5
    method: str = "ssim"
    epochs: int = 12
    batch_size: int = 16
    baseline: bool = True
    workdir: Path = Path("runs/distill")
    name: str = "distill"
    experiment: str = "detkd-distill"


def teacher_reference(ref: str, *, tracking_uri: str | None, cache_dir: Path) -> tuple[str, Path]:
    """(the source to write in the spec, a local checkpoint to read the teacher's meta from)."""
    from detkd.engine.teachers import resolve_source

    pipeline, sep, model = ref.rpartition(":")
    if sep and pipeline.endswith((".yaml", ".yml")):
        spec = read_pipeline(Path(pipeline))
        path = (Path(spec.workdir) / "models" / model / "model.pt").resolve()
        names = [e.name for e in spec.teachers + spec.students] + [t.name for t in spec.tune]
        if model not in names:
            raise ConfigError(f"--teacher {ref}: {pipeline} has no model {model!r} (models: {', '.join(names)})")
        if not path.is_file():
            raise ConfigError(f"--teacher {ref}: {path} does not exist yet: run `detkd run {pipeline}` first")
        return str(path), path
    path = resolve_source(ref, cache_dir=cache_dir, tracking_uri=tracking_uri)
    source = ref if ref.startswith(("models:/", "mlflow:")) else str(Path(path).resolve())
    return source, Path(path)


def teacher_meta(path: Path, *, ref: str) -> CheckpointMeta:
    try:
        meta = read_checkpoint_meta(path)
    except CheckpointError as exc:
        raise ConfigError(f"--teacher {ref}: {exc}") from None
    if not meta.plan:
        raise ConfigError(f"--teacher {ref}: {path} records no run plan, so its input size is unknown")
    return meta


def data_section(
    data: Path,
    *,
    images: Path | None = None,
    val: Path | None = None,
    val_images: Path | None = None,
    workdir: Path,
) -> dict[str, Any]:
    """A pipeline's ``data`` section for a dataset path: train, and val/test as the data has them.

    A COCO file given without ``val`` has every 5th image held out, written to ``workdir/data/``.
    """
    data = Path(data)
    if data.suffix in (".yaml", ".yml"):
        return _yolo_splits(data)
    if data.is_dir():
        return _voc_splits(data)
    if data.suffix == ".json":
        return _coco_splits(data, images=images, val=val, val_images=val_images, workdir=workdir)
    raise ConfigError(
        f"--data {data}: not a YOLO data.yaml, a Pascal VOC folder (Annotations/, ImageSets/Main/) "
        "or a COCO JSON file (with --images)"
    )


def _yolo_splits(data: Path) -> dict[str, Any]:
    if not data.is_file():
        raise ConfigError(f"--data {data}: file not found")
    names = read_yaml(data)
    path = str(data.resolve())
    splits = {split: {"yolo": path, "split": split} for split in ("train", "val", "test") if names.get(split)}
    if "train" not in splits:
        raise ConfigError(f"--data {data}: train: the data.yaml has no train split")
    if len(splits) == 1:
        raise ConfigError(f"--data {data}: val, test: the data.yaml has no held-out split to score the students on")
    return splits


def _voc_splits(root: Path) -> dict[str, Any]:
    lists = root / "ImageSets" / "Main"
    available = {p.stem for p in lists.glob("*.txt") if "_" not in p.stem} if lists.is_dir() else set()
    if not (root / "Annotations").is_dir() or not available:
        raise ConfigError(f"--data {root}: not a Pascal VOC folder (needs Annotations/ and ImageSets/Main/<split>.txt)")
    train = "train" if "train" in available else "trainval" if "trainval" in available else None
    if train is None:
        raise ConfigError(f"--data {root}: ImageSets/Main has no train.txt or trainval.txt (found {sorted(available)})")
    path = str(root.resolve())
    splits = {"train": {"voc": path, "split": train}}
    if train == "train" and "val" in available:
        splits["val"] = {"voc": path, "split": "val"}
    if "test" in available:
        splits["test"] = {"voc": path, "split": "test"}
    if len(splits) == 1:
        raise ConfigError(f"--data {root}: ImageSets/Main has no val.txt or test.txt to score the students on")
    return splits


def _coco_splits(
    data: Path, *, images: Path | None, val: Path | None, val_images: Path | None, workdir: Path
) -> dict[str, Any]:
    if images is None:
        raise ConfigError(f"--data {data}: a COCO JSON needs --images (the folder its file_name entries are in)")
    from detkd.data.coco import load_coco

    images = Path(images).resolve()
    load_coco(data, images)  # refuse bad data now, naming its records
    if val is not None:
        val_images = Path(val_images or images).resolve()
        load_coco(Path(val), val_images)
        return {
            "train": {"coco": str(data.resolve()), "images": str(images)},
            "test": {"coco": str(Path(val).resolve()), "images": str(val_images)},
        }
    train, held_out = _hold_out(json.loads(data.read_text()))
    folder = Path(workdir).resolve() / "data"
    files = {}
    for split, subset in (("train", train), ("test", held_out)):
        files[split] = folder / f"{split}.json"
        atomic_write_bytes(files[split], json.dumps(subset).encode())
    log.info(
        f"data: held out {len(held_out['images'])} of {len(held_out['images']) + len(train['images'])} images "
        f"(every {HOLDOUT_EVERY}th by id) to score the students on: {files['test']}"
    )
    return {split: {"coco": str(path), "images": str(images)} for split, path in files.items()}


def _hold_out(coco: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, held-out) COCO dicts: every HOLDOUT_EVERY-th image by id is held out."""
    ordered = sorted(coco["images"], key=lambda image: image["id"])
    held = {image["id"] for k, image in enumerate(ordered) if k % HOLDOUT_EVERY == HOLDOUT_EVERY - 1}
    if not held or len(held) == len(ordered):
        raise ConfigError(f"need at least {HOLDOUT_EVERY} images to hold some out, got {len(ordered)}")

    def subset(keep) -> dict[str, Any]:
        return {
            **coco,
            "images": [image for image in coco["images"] if keep(image["id"])],
            "annotations": [a for a in coco["annotations"] if keep(a["image_id"])],
        }

    return subset(lambda i: i not in held), subset(lambda i: i in held)


def student_model(request: DistillRequest, teacher: CheckpointMeta) -> dict[str, Any]:
    """The preset, with the teacher's pyramid shifted down by the scale (same feature-map sizes per level)."""
    if request.student not in STUDENTS:
        raise ConfigError(f"--student {request.student!r}: choose one of {', '.join(STUDENTS)}")
    model = dict(STUDENTS[request.student])
    levels = teacher.model if teacher.model.get("arch") != "mmdet" else {}
    min_level, max_level = int(levels.get("min_level", 3)), int(levels.get("max_level", 7))
    try:
        shift = level_shift(request.scale) if request.scale < 1 else 0
    except ValueError:
        shift = 0  # not 1/2**k: the levels cannot line up exactly; keep the teacher's
    model.update(min_level=max(2, min_level - shift), max_level=max(2, min_level - shift, max_level - shift))
    return model


def distill_pipeline(request: DistillRequest, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """The pipeline spec (as YAML data) that ``request`` describes; ConfigError on a bad request."""
    if request.method not in METHOD_ORDER:
        raise ConfigError(f"--method {request.method!r}: choose one of {', '.join(METHOD_ORDER)}")
    if not 0 < request.scale <= 1:
        raise ConfigError(f"--scale {request.scale}: the student's scale must be in (0, 1]")
    workdir = Path(request.workdir).resolve()
    source, path = teacher_reference(request.teacher, tracking_uri=tracking_uri, cache_dir=workdir / ".teachers")
    teacher = teacher_meta(path, ref=request.teacher)
    view = teacher.plan["input"]
    reference_size = round(float(view["size"]) * float(view["scale"]))
    student = {"input": {"scale": request.scale}}
    distilled = f"student_{request.method}"
    students = [
        {
            "name": distilled,
            "settings": {**student, "distill": {"teachers": [{"source": source}], request.method: {}}},
        }
    ]
    if request.baseline:
        students.insert(0, {"name": "student_baseline", "settings": student})
    return {
        "name": request.name,
        "workdir": str(workdir),
        "tracking": {"experiment": request.experiment, **({"tracking_uri": tracking_uri} if tracking_uri else {})},
        "data": data_section(
            request.data, images=request.images, val=request.val, val_images=request.val_images, workdir=workdir
        ),
        "defaults": {
            "model": student_model(request, teacher),
            "input": {"size": reference_size, "max_size": view.get("max_size")},
            "train": {"epochs": request.epochs, "batch_size": request.batch_size},
        },
        "students": students,
    }


def write_distill_pipeline(
    request: DistillRequest, *, overrides: list[str] | None = None, tracking_uri: str | None = None
) -> Path:
    """Write ``OUT/pipeline.yaml`` and ``OUT/configs/<student>.yaml``; returns the pipeline file (validated).

    ``overrides`` (``--set key=value`` on the spec) are written into the files: they are the config that runs."""
    spec_data = apply_overrides(distill_pipeline(request, tracking_uri=tracking_uri), overrides or [])
    workdir = Path(spec_data["workdir"])
    path = workdir / "pipeline.yaml"
    options = "".join(f" --set {item}" for item in overrides or [])
    header = (
        f"# Written by `detkd distill --teacher {request.teacher} --data {request.data}{options}`.\n"
        f"# Rerun it with `detkd run {path}`, or edit it first (docs/pipelines.md).\n"
    )
    atomic_write_bytes(path, (header + yaml.safe_dump(spec_data, sort_keys=False)).encode())
    spec: PipelineSpec = read_pipeline(path)
    for entry in spec.students:
        write_run_config(spec, entry, workdir / "configs" / f"{entry.name}.yaml")
    return path


def write_run_config(spec: PipelineSpec, entry: ModelEntry, path: Path) -> None:
    """The full run config of one student, as ``detkd train``/``detkd distill`` read it."""
    cfg = model_config(spec, entry, role="student")
    data = cfg.model_dump(mode="json", exclude={"debug"})
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())
