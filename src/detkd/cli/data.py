"""``detkd data``: synthesize, check, convert and preview datasets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from detkd.cli.common import SetOption, _fail, _user_errors, console, data_app, err_console


def _synth_default(name: str):
    from detkd.data.synth import SynthSpec

    return SynthSpec.model_fields[name].default


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="output folder")],
    images: int = _synth_default("images"),
    size: Annotated[int, typer.Option(help="nominal image side (sqrt of the area) in pixels")] = _synth_default("size"),
    seed: int = _synth_default("seed"),
    val_fraction: float = _synth_default("val_fraction"),
    test_images: Annotated[
        int, typer.Option(help="extra images in a held-out test split (train/val unchanged)")
    ] = _synth_default("test_images"),
    min_object: float = _synth_default("min_object"),
    max_object: float = _synth_default("max_object"),
    max_objects: int = _synth_default("max_objects"),
    clutter: float = _synth_default("clutter"),
    noise: float = _synth_default("noise"),
    overlap: Annotated[float, typer.Option(help="max IoU between two objects")] = _synth_default("overlap"),
    aspect_ratios: Annotated[
        tuple[float, float], typer.Option(help="width/height range, drawn log-uniformly per image")
    ] = _synth_default("aspect_ratios"),
    size_jitter: Annotated[float, typer.Option(help="per-image size factor drawn in [1 - j, 1 + j]")] = _synth_default(
        "size_jitter"
    ),
    classes: Annotated[str, typer.Option(help="comma-separated shape names")] = ",".join(_synth_default("classes")),
) -> None:
    """Write a deterministic synthetic COCO detection dataset (square images unless asked otherwise)."""
    options = {k: v for k, v in locals().items() if k != "out"}  # every option is a SynthSpec field
    from detkd.config import validate_config
    from detkd.data.synth import SynthSpec, synthesize

    try:
        spec = validate_config(options, source="detkd data synth", model=SynthSpec)
        summary = synthesize(out, spec)
    except _user_errors() as exc:
        _fail(exc)
    console.print_json(json.dumps(summary, default=str))


CocoOption = Annotated[Path | None, typer.Option(help="COCO instances JSON (with --images)")]
ImagesOption = Annotated[Path | None, typer.Option(help="the folder the COCO file names are relative to")]
YoloOption = Annotated[Path | None, typer.Option(help="a YOLO data.yaml, Ultralytics layout (with --split)")]
VocOption = Annotated[Path | None, typer.Option(help="a Pascal VOC folder (with --split)")]
SplitOption = Annotated[
    str | None, typer.Option(help="--yolo: train, val or test; --voc: an ImageSets/Main name, e.g. trainval")
]
ClassesOption = Annotated[
    str | None, typer.Option(help="--voc: comma-separated class names in id order (default: the 20 VOC classes)")
]


@dataclass(frozen=True)
class _Dataset:
    """The dataset a ``detkd data`` command was pointed at, its options checked."""

    coco: Path | None = None
    images: Path | None = None
    yolo: Path | None = None
    voc: Path | None = None
    split: str | None = None
    classes: list[str] | None = None

    @property
    def title(self) -> str:
        return str(self.coco) if self.coco is not None else f"{self.yolo or self.voc}#{self.split}"

    def validate(self, *, verify_images: bool):
        from detkd.data.coco import validate_coco
        from detkd.data.voc import validate_voc
        from detkd.data.yolo import validate_yolo

        if self.yolo is not None:
            return validate_yolo(self.yolo, self.split, verify_images=verify_images)
        if self.voc is not None:
            return validate_voc(self.voc, self.split, classes=self.classes, verify_images=verify_images)
        return validate_coco(self.coco, self.images, verify_images=verify_images)

    def load(self, *, skip_invalid: bool):
        from detkd.data import open_source

        return open_source(**asdict(self), skip_invalid=skip_invalid)


def _dataset(
    *, coco=None, images=None, yolo=None, voc=None, split=None, classes=None, coco_allowed: bool = True
) -> _Dataset:
    """The one dataset the options name; an ``error:`` line and exit 2 unless exactly one is complete."""
    ways = ["--coco FILE --images DIR"] if coco_allowed else []
    ways += ["--yolo DATA.yaml --split S", "--voc DIR --split S"]
    given = [name for name, value in (("--coco/--images", coco or images), ("--yolo", yolo), ("--voc", voc)) if value]
    if not given:
        _fail(ValueError(f"no dataset given: give {' or '.join(ways)}"))
    if len(given) > 1:
        _fail(ValueError(f"give one dataset, not both {' and '.join(given)}"))
    if coco is not None and images is None:
        _fail(ValueError("--coco needs --images (the folder its file names are relative to)"))
    if images is not None and coco is None:
        _fail(ValueError("--images needs --coco"))
    if (yolo or voc) and not split:
        which = "train, val or test" if yolo else "an ImageSets/Main name, e.g. trainval"
        _fail(ValueError(f"--{'yolo' if yolo else 'voc'} needs --split ({which})"))
    if split is not None and not (yolo or voc):
        _fail(ValueError("--split picks a split of a --yolo or --voc dataset"))
    if classes is not None and voc is None:
        _fail(ValueError("--classes names the classes of a --voc dataset (YOLO's are in its data.yaml)"))
    names = None if classes is None else [c.strip() for c in classes.split(",") if c.strip()]
    return _Dataset(coco=coco, images=images, yolo=yolo, voc=voc, split=split, classes=names)


@data_app.command("check")
def data_check(
    coco: CocoOption = None,
    images: ImagesOption = None,
    yolo: YoloOption = None,
    voc: VocOption = None,
    split: SplitOption = None,
    classes: ClassesOption = None,
    verify_images: Annotated[bool, typer.Option(help="decode every image")] = True,
) -> None:
    """Validate a COCO, YOLO or VOC dataset; print a summary, or one line per problem and exit 2."""
    from rich.table import Table

    dataset = _dataset(coco=coco, images=images, yolo=yolo, voc=voc, split=split, classes=classes)
    _, problems, summary = dataset.validate(verify_images=verify_images)
    table = Table(title=dataset.title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("images", "annotations", "crowd"):
        table.add_row(key, str(summary.get(key, "")))
    for cat in summary.get("categories", []):
        table.add_row(f"category {cat['id']} {cat['name']}", str(cat["count"]))
    for bucket, count in summary.get("size_histogram", {}).items():
        table.add_row(f"boxes sqrt(area) {bucket} px", str(count))
    console.print(table)
    if problems:
        for problem in problems:
            err_console.print(f"[red]error:[/red] {problem}", highlight=False, soft_wrap=True)
        err_console.print(f"{len(problems)} problem(s) found")
        raise typer.Exit(2)
    console.print("[green]ok[/green]: no problems found")


@data_app.command("to-coco")
def data_to_coco(
    out: Annotated[Path, typer.Option(help="the COCO instances JSON to write")],
    yolo: YoloOption = None,
    voc: VocOption = None,
    split: SplitOption = None,
    classes: ClassesOption = None,
    skip_invalid: Annotated[bool, typer.Option(help="drop invalid records instead of refusing the dataset")] = False,
) -> None:
    """Convert a YOLO or VOC split to a COCO instances JSON; its file names are relative to the printed folder."""
    from detkd.data.coco_writer import images_folder, write_coco

    dataset = _dataset(yolo=yolo, voc=voc, split=split, classes=classes, coco_allowed=False)
    try:
        source = dataset.load(skip_invalid=skip_invalid)
        write_coco(source, out)
    except (*_user_errors(), ValueError) as exc:
        _fail(exc)
    annotations = sum(r.num_annotations for r in source.records)
    console.print(
        f"wrote {out}: {len(source.records)} images, {annotations} annotations, {source.num_classes} categories",
        highlight=False,
    )
    console.print(f"images folder (give it as --images): {images_folder(source)}", highlight=False, soft_wrap=True)


@data_app.command("to-parquet")
def data_to_parquet(
    out: Annotated[Path, typer.Option(help="output folder for part-*.parquet")],
    coco: CocoOption = None,
    images: ImagesOption = None,
    yolo: YoloOption = None,
    voc: VocOption = None,
    split: SplitOption = None,
    classes: ClassesOption = None,
    shard_size: Annotated[int, typer.Option(min=1)] = 512,
    skip_invalid: bool = False,
) -> None:
    """Convert a COCO, YOLO or VOC dataset to Parquet shards (image bytes + boxes + labels)."""
    from detkd.data.parquet import write_parquet

    dataset = _dataset(coco=coco, images=images, yolo=yolo, voc=voc, split=split, classes=classes)
    try:
        source = dataset.load(skip_invalid=skip_invalid)
        paths = write_parquet(source, out, shard_size=shard_size)
    except (*_user_errors(), ValueError) as exc:
        _fail(exc)
    console.print(f"wrote {len(paths)} shard(s), {len(source.records)} images to {out}")


@data_app.command("preview")
def data_preview(
    config: Annotated[Path, typer.Argument(help="run config YAML, or a pipeline spec with --model")],
    out: Annotated[Path, typer.Option(help="output folder (created; a non-empty one needs --overwrite)")],
    model: Annotated[
        str | None, typer.Option(help="CONFIG is a pipeline spec: preview this teacher or student of it")
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="the first N training samples")] = 8,
    seed: Annotated[int | None, typer.Option(help="augmentation seed (default: the config's seed)")] = None,
    overrides: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out folder")] = False,
) -> None:
    """Draw the training views of a config (augmentation included): teacher and student view per sample."""
    from detkd.config import load_config
    from detkd.engine.preview import write_preview

    try:
        cfg = load_config(config, overrides or []) if model is None else _pipeline_model(config, model, overrides)
        entries = write_preview(cfg, out=out, images=images, seed=seed, overwrite=overwrite)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"wrote {len(entries)} sample(s) to {out}: <k>_teacher.png, <k>_student.png, boxes.json")


def _pipeline_model(path: Path, name: str, overrides):
    """The run config of the teacher or student ``name`` of the pipeline spec at ``path``.

    A pipeline's synthetic data exists only once its data step ran (``detkd step PIPELINE data``)."""
    from detkd.config import ConfigError
    from detkd.pipeline.spec import model_config, read_pipeline

    spec = read_pipeline(path, overrides or [])
    for role, entries in (("teacher", spec.teachers), ("student", spec.students)):
        for entry in entries:
            if entry.name == name:
                return model_config(spec, entry, role=role, source=f"{path}: {name}")
    names = [e.name for e in spec.teachers + spec.students]
    raise ConfigError(f"{path}: --model {name!r}: no such teacher or student (models: {', '.join(names)})")
