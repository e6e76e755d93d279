"""``detkd data``: synthesize, check, convert and preview datasets."""

from __future__ import annotations

import json
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


@data_app.command("check")
def data_check(
    coco: Annotated[Path, typer.Option(help="COCO instances JSON")],
    images: Annotated[Path, typer.Option(help="image folder")],
    verify_images: Annotated[bool, typer.Option(help="decode every image")] = True,
) -> None:
    """Validate a COCO dataset; print a summary, or one line per problem and exit 2."""
    from rich.table import Table

    from detkd.data.coco import validate_coco

    _, problems, summary = validate_coco(coco, images, verify_images=verify_images)
    table = Table(title=f"{coco}")
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


@data_app.command("to-parquet")
def data_to_parquet(
    coco: Annotated[Path, typer.Option(help="COCO instances JSON")],
    images: Annotated[Path, typer.Option(help="image folder")],
    out: Annotated[Path, typer.Option(help="output folder for part-*.parquet")],
    shard_size: Annotated[int, typer.Option(min=1)] = 512,
    skip_invalid: bool = False,
) -> None:
    """Convert a COCO dataset to Parquet shards (image bytes + boxes + labels)."""
    from detkd.data.coco import load_coco
    from detkd.data.parquet import write_parquet

    try:
        source = load_coco(coco, images, skip_invalid=skip_invalid)
        paths = write_parquet(source, out, shard_size=shard_size)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"wrote {len(paths)} shard(s), {len(source.records)} images to {out}")


@data_app.command("preview")
def data_preview(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    out: Annotated[Path, typer.Option(help="output folder (created; a non-empty one needs --overwrite)")],
    images: Annotated[int, typer.Option(min=1, help="the first N training samples")] = 8,
    seed: Annotated[int | None, typer.Option(help="augmentation seed (default: the config's seed)")] = None,
    overrides: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out folder")] = False,
) -> None:
    """Draw the training views of a config (augmentation included): teacher and student view per sample."""
    from detkd.config import load_config
    from detkd.engine.preview import write_preview

    try:
        cfg = load_config(config, overrides or [])
        entries = write_preview(cfg, out=out, images=images, seed=seed, overwrite=overwrite)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"wrote {len(entries)} sample(s) to {out}: <k>_teacher.png, <k>_student.png, boxes.json")
