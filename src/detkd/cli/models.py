"""The model commands: ``detkd train``, ``distill``, ``evaluate``, ``export``, ``lineage``, ``models ...``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from detkd.cli.common import (
    FreshOption,
    RayAddressOption,
    SetOption,
    _fail,
    _fail_pipeline,
    _fail_undelivered,
    _local_model,
    _os_errors,
    _print_errors,
    _user_errors,
    app,
    console,
)


@app.command("train")
def train(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    overrides: SetOption = None,
    summary: Annotated[Path | None, typer.Option(help="write a JSON summary row here")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="drop invalid records instead of refusing the data")] = False,
    address: RayAddressOption = None,
    fresh: FreshOption = False,
) -> None:
    """Train a teacher or a plain student with Ray Train."""
    _train(config, overrides, summary, skip_invalid, address, fresh, distill=False)


@app.command("distill")
def distill(
    config: Annotated[
        Path | None, typer.Argument(help="run config YAML with a distill section (or use --teacher and --data)")
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="no YAML: the teacher (checkpoint, models:/NAME@ALIAS, mlflow:<run_id>, PIPELINE.yaml:MODEL)"
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="no YAML: a YOLO data.yaml, a Pascal VOC folder, or a COCO JSON (with --images)")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="the image folder of a COCO --data file")] = None,
    val: Annotated[Path | None, typer.Option(help="COCO: a held-out JSON (default: every 5th image of --data)")] = None,
    val_images: Annotated[Path | None, typer.Option(help="the image folder of --val (default: --images)")] = None,
    student: Annotated[
        str, typer.Option(help="student preset: lite, tiny, mobilenet_v3_small, mobilenet_v3_large, resnet18")
    ] = "lite",
    scale: Annotated[float, typer.Option(help="the student's input scale relative to the teacher's")] = 0.5,
    method: Annotated[str, typer.Option(help="mse, ssim, mgd, msad or dsamkd")] = "ssim",
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    batch_size: Annotated[int, typer.Option(min=1, help="per worker")] = 16,
    baseline: Annotated[bool, typer.Option(help="also train the undistilled student to compare with")] = True,
    out: Annotated[
        Path | None, typer.Option(help="where the pipeline, configs and models go (default: runs/<name>)")
    ] = None,
    name: Annotated[str, typer.Option(help="the pipeline's name")] = "distill",
    overrides: SetOption = None,
    summary: Annotated[Path | None, typer.Option(help="write a JSON summary row here")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="drop invalid records instead of refusing the data")] = False,
    address: RayAddressOption = None,
    fresh: FreshOption = False,
) -> None:
    """Distill frozen teachers into a student: from a run config, or from a teacher and a dataset in one command.

    With --teacher and --data, detkd writes a pipeline (OUT/pipeline.yaml, and each student's run config in
    OUT/configs/), trains the distilled student and its undistilled baseline, and prints both on the held-out split.
    """
    quick = teacher is not None or data is not None
    if quick:
        if config is not None:
            _fail(ValueError("give a run config YAML, or --teacher and --data, not both"))
        if teacher is None or data is None:
            _fail(ValueError("distilling without a YAML file needs both --teacher and --data"))
        if skip_invalid:
            _fail(ValueError("--skip-invalid applies to a run config; fix or drop the bad records of --data first"))
        from detkd.pipeline.from_teacher import DistillRequest

        request = DistillRequest(
            teacher=teacher, data=data, images=images, val=val, val_images=val_images, student=student, scale=scale,
            method=method, epochs=epochs, batch_size=batch_size, baseline=baseline,
            workdir=out if out is not None else Path("runs") / name, name=name,
        )  # fmt: skip
        _distill_from_teacher(request, overrides, summary, address, fresh)
        return
    if config is None:
        _fail(ValueError("give a run config YAML, or --teacher and --data"))
    _train(config, overrides, summary, skip_invalid, address, fresh, distill=True)


def _distill_from_teacher(request, overrides, summary: Path | None, address, fresh: bool) -> None:
    from detkd.pipeline.from_teacher import write_distill_pipeline
    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import PipelineFailed, run_pipeline, summary_table, write_summary

    try:
        path = write_distill_pipeline(request, overrides=overrides)
        console.print(f"pipeline: {path} (run configs in {path.parent / 'configs'})", highlight=False)
        spec = load_pipeline(path)
        with _os_errors():
            rows = run_pipeline(spec, address=address, fresh=fresh)
    except _user_errors() as exc:
        _fail(exc)
    except PipelineFailed as exc:
        _fail_pipeline(exc)
    console.print(summary_table(rows))
    if summary is not None:
        write_summary(rows, summary)


def _train(config: Path, overrides, summary, skip_invalid: bool, address, fresh: bool, *, distill: bool) -> None:
    from detkd.config import ConfigError, load_config
    from detkd.engine.launch import run_training
    from detkd.engine.plan import open_split, stage_configs
    from detkd.engine.storage_errors import StorageUnreachable
    from detkd.pipeline.runner import evaluation_row, write_summary
    from detkd.tracking.delivery import TrackingNotDelivered

    try:
        cfg = load_config(config, overrides or [])
        if distill and (cfg.distill is None or not (cfg.distill.teachers or cfg.distill.stages)):
            raise ConfigError(f"{config}: distill: needs distill.teachers (or distill.stages) and a method")
        if cfg.distill is not None and cfg.distill.stages:
            stage_configs(cfg)  # validate every stage before training any
        if summary is not None and cfg.data.val is None and cfg.data.test is None:
            raise ConfigError(f"{config}: data.val: --summary needs a validation (or data.test) split to evaluate on")
        if skip_invalid:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"skip_invalid": True})})
        with _os_errors():
            outcome = run_training(cfg, address=address, fresh=fresh)
    except _user_errors() as exc:
        _fail(exc)
    except TrackingNotDelivered as exc:  # trained and published; MLflow missed part of it
        _fail_undelivered(exc)
    except StorageUnreachable as exc:  # not the input's fault: exit code 1
        _print_errors(exc)
        raise typer.Exit(1) from None
    console.print(f"[green]done[/green]: {outcome.model_path} (MLflow run {outcome.run_id}, {outcome.seconds:.0f}s)")
    if summary is not None:
        split_name = "test" if cfg.data.test is not None else "val"
        source = open_split(getattr(cfg.data, split_name), skip_invalid=cfg.data.skip_invalid)
        row, _ = evaluation_row(cfg, outcome, source, batch_size=cfg.eval.batch_size, split=split_name)
        write_summary([row], summary)


@app.command("evaluate")
def evaluate(
    model: Annotated[
        str | None, typer.Argument(help="checkpoint file or models:/NAME@ALIAS (same as --checkpoint)")
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="detkd model checkpoint (model.pt), or models:/NAME@ALIAS|VERSION")
    ] = None,
    coco: Annotated[Path | None, typer.Option(help="COCO JSON of the split to evaluate")] = None,
    images: Annotated[Path | None, typer.Option(help="image folder of that split")] = None,
    parquet: Annotated[Path | None, typer.Option(help="Parquet shards of the split")] = None,
    yolo: Annotated[Path | None, typer.Option(help="a YOLO data.yaml (with --split)")] = None,
    voc: Annotated[Path | None, typer.Option(help="a Pascal VOC folder (with --split)")] = None,
    split: Annotated[str | None, typer.Option(help="--yolo/--voc: the split to evaluate on, e.g. val or test")] = None,
    classes: Annotated[
        str | None, typer.Option(help="--voc: comma-separated class names in id order (default: the 20 VOC classes)")
    ] = None,
    gt: Annotated[Path | None, typer.Option(help="score an existing results file: ground truth JSON")] = None,
    detections: Annotated[Path | None, typer.Option(help="...and the COCO results JSON to score")] = None,
    out: Annotated[Path | None, typer.Option(help="write detections (COCO results format) here")] = None,
    summary: Annotated[Path | None, typer.Option(help="write a JSON summary row here")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    score_thresh: Annotated[float, typer.Option(min=0, max=1)] = 0.01,
    backend: Annotated[str, typer.Option(help="faster or pycocotools")] = "faster",
) -> None:
    """COCO box mAP of a checkpoint on a split, or of an existing results file."""
    if backend not in ("faster", "pycocotools"):
        _fail(ValueError(f"--backend must be faster or pycocotools, got {backend!r}"))
    if model is not None and checkpoint is not None:
        _fail(ValueError("give the model once: as the argument or as --checkpoint"))
    checkpoint = model if model is not None else checkpoint
    if gt is not None or detections is not None:
        _score_results_file(gt, detections, checkpoint=checkpoint, summary=summary, backend=backend)
    else:
        _evaluate_model(
            checkpoint, coco=coco, images=images, parquet=parquet, yolo=yolo, voc=voc, split=split,
            classes=classes, out=out, summary=summary,
            batch_size=batch_size, score_thresh=score_thresh,
        )  # fmt: skip


def _score_results_file(gt, detections, *, checkpoint, summary: Path | None, backend: str) -> None:
    """``detkd evaluate --gt G --detections D``: score a COCO results file against its ground truth."""
    from detkd.engine.coco_eval import METRIC_NAMES, evaluate_files
    from detkd.pipeline.runner import write_summary
    from detkd.records import SummaryRow

    try:
        if gt is None or detections is None or checkpoint is not None:
            raise FileNotFoundError("scoring a results file needs --gt and --detections (and no --checkpoint)")
        metrics = evaluate_files(gt, detections, backend=backend)
    except (*_user_errors(), ValueError) as exc:
        _fail(exc)
    _print_metrics(metrics, METRIC_NAMES)
    if summary:
        row = SummaryRow.measured(
            name=detections.stem, role="results", input_size=0, metrics=metrics, images_per_s=0.0, run_id=None,
            split=str(gt),
        )  # fmt: skip
        write_summary([row], summary)


def _evaluate_model(
    checkpoint,
    *,
    coco,
    images,
    parquet,
    yolo,
    voc,
    split,
    classes: str | None,
    out: Path | None,
    summary: Path | None,
    batch_size: int,
    score_thresh: float,
) -> None:
    """``detkd evaluate MODEL --coco/--images|--parquet|--yolo/--voc --split``: run a checkpoint over a split and
    score it."""
    from detkd.engine.coco_eval import METRIC_NAMES
    from detkd.pipeline.runner import write_summary
    from detkd.records import SummaryRow

    try:
        if checkpoint is None:
            raise FileNotFoundError("give --checkpoint with --coco/--images or --parquet, or --gt with --detections")
        from detkd.data import open_source
        from detkd.engine.evaluate import evaluate_checkpoint
        from detkd.models.checkpoint import atomic_write_bytes

        if (yolo or voc) and not split:
            raise ValueError(f"--{'yolo' if yolo else 'voc'} needs --split (the split to evaluate on)")
        names = None if classes is None else [c.strip() for c in classes.split(",") if c.strip()]
        source = open_source(coco=coco, images=images, parquet=parquet, yolo=yolo, voc=voc, split=split, classes=names)
        local = _local_model(checkpoint)
        result = evaluate_checkpoint(local, source, batch_size=batch_size, score_thresh=score_thresh)
    except (*_user_errors(), ValueError) as exc:
        _fail(exc)
    _print_metrics(result.metrics, METRIC_NAMES)
    console.print(f"inference: {result.images_per_s:.1f} images/s at {result.input_size}px (batch {batch_size}, CPU)")
    if out:
        atomic_write_bytes(out, json.dumps(result.detections).encode())
        console.print(f"detections: {out} ({len(result.detections)})")
    if summary:
        meta = result.meta
        row = SummaryRow.measured(
            name=str(meta.get("name", local.stem)),
            role=str(meta.get("role", "model")),
            input_size=result.input_size,
            metrics=result.metrics,
            images_per_s=result.images_per_s,
            run_id=meta.get("mlflow_run_id"),
            method=meta.get("method"),
            split=str(coco or parquet),
        )
        write_summary([row], summary)


def _print_metrics(metrics: dict[str, float], names) -> None:
    console.print("  ".join(f"{name} {metrics[name]:.4f}" for name in names))


@app.command("export")
def export(
    model: Annotated[str, typer.Argument(help="checkpoint (model.pt) of a student or teacher, or models:/NAME@ALIAS")],
    format: Annotated[str, typer.Option("--format", help="onnx or torchscript")] = ...,
    out: Annotated[Path, typer.Option("--out", help="file to write")] = ...,
    score_threshold: Annotated[
        float, typer.Option(min=0, max=1, help="lowest score the exported graph keeps (fixed in it)")
    ] = 0.05,
    max_detections: Annotated[int, typer.Option(min=1, help="detections per image kept (fixed in the graph)")] = 100,
) -> None:
    """Export a detector for deployment; the file is checked against PyTorch before it is written."""
    from detkd.serving.export import FORMATS, ExportError, export_detector

    if format not in FORMATS:
        _fail(ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}"))
    try:
        result = export_detector(
            _local_model(model), format=format, out=out, score_thresh=score_threshold, detections_per_img=max_detections
        )
    except (*_user_errors(), ExportError) as exc:
        _fail(exc)
    probes = "a probe image" if result.probe_images == 1 else f"{result.probe_images} probe images"
    console.print(
        f"{format}: {out} ({out.stat().st_size / 1e6:.1f} MB; boxes within "
        f"{result.max_box_difference_px:.2g} px of PyTorch on {probes})"
    )


@app.command("lineage")
def lineage(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or a run id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the tree as JSON")] = False,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    ] = None,
) -> None:
    """Where a model came from: datasets -> teachers -> stages -> student -> registered version."""
    from detkd.tracking.lineage import lineage_tree, render
    from detkd.tracking.runs import check_tracking_uri, resolve_tracking_uri

    try:
        uri = resolve_tracking_uri(tracking_uri)
        check_tracking_uri(uri)
        tree = lineage_tree(model, uri)
    except _user_errors() as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(tree.as_dict(), indent=2))
    else:
        console.print(render(tree))


models_app = typer.Typer(no_args_is_help=True, help="Model settings: the torchvision detectors detkd builds.")
app.add_typer(models_app, name="models")


@models_app.command("torchvision-config")
def torchvision_config(
    name: Annotated[str, typer.Argument(help="a torchvision detection builder, e.g. fcos_resnet50_fpn")],
) -> None:
    """Print the `model:` settings that build torchvision's NAME: its published file then loads as model.weights."""
    import yaml

    from detkd.models.torchvision_zoo import TORCHVISION_FILES, TORCHVISION_INPUT, torchvision_model_config

    try:
        settings = torchvision_model_config(name)
    except ValueError as exc:
        _fail(exc)
    size, max_size = TORCHVISION_INPUT["size"], TORCHVISION_INPUT["max_size"]
    print(f"# torchvision's {name}; its COCO file: {TORCHVISION_FILES[name]}")
    print(f"# torchvision resizes to a short side of {size}, a long side of at most {max_size}:")
    print(f"# input: {{size: {size}, max_size: {max_size}}}. trainable_layers is its fine-tuning default.")
    settings["weights"] = f"path/to/{TORCHVISION_FILES[name]}"
    print(yaml.safe_dump({"model": settings}, sort_keys=False, default_flow_style=None), end="")


@models_app.command("pretrain-vit")
def pretrain_vit(
    out: Annotated[Path, typer.Option(help="the folder to write (a backbone teacher: distill.teachers[].backbone)")],
    config: Annotated[Path, typer.Option(help="a ViT config: a folder with config.json, or the JSON file")] = Path(
        "configs/hf/vit_tiny"
    ),
    images: Annotated[Path | None, typer.Option(help="pretrain on every image under this folder (recursively)")] = None,
    pipeline: Annotated[
        Path | None, typer.Option(help="pretrain on this pipeline's train split (synthesized if absent)")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 50,
    size: Annotated[int, typer.Option(min=1, help="global crop side in px, a multiple of the patch size")] = 112,
    batch_size: Annotated[int, typer.Option(min=2)] = 64,
    seed: Annotated[int, typer.Option()] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """DINO self-distillation of a small ViT on unlabelled images: a foundation-backbone stand-in to distill from."""
    from detkd.models.vit_pretrain import PretrainSettings, find_images, pretrain_vit
    from detkd.models.vit_teacher import read_vit_config

    try:
        if (images is None) == (pipeline is None):
            raise ValueError("give exactly one of --images DIR or --pipeline FILE.yaml")
        if out.exists() and not overwrite:
            raise FileExistsError(f"--out {out}: already exists (pass --overwrite to replace it)")
        read_vit_config(config)  # refuse a bad config before synthesizing or reading any data
        if pipeline is not None:
            files, source = _pipeline_train_images(pipeline)
        else:
            files, source = find_images(folder=images), str(images)
        settings = PretrainSettings(epochs=epochs, size=size, batch_size=batch_size, seed=seed)
        record = pretrain_vit(
            config=config, images=files, out=out, settings=settings, image_source=source, overwrite=overwrite
        )
    except (*_user_errors(), ValueError, FileExistsError) as exc:
        _fail(exc)
    first, last = record["epochs"][0], record["epochs"][-1]
    console.print(
        f"[green]done[/green]: {out} ({record['images']} images, {len(record['epochs'])} epochs, "
        f"{record['seconds']:.0f}s; loss {first['loss']:.3f} -> {last['loss']:.3f})",
        highlight=False,
    )


def _pipeline_train_images(pipeline: Path) -> tuple[list[Path], str]:
    """The images of a pipeline's train split only (never val or test: they score the students), synthesizing
    the pipeline's data first when it is synthetic and not there yet."""
    from detkd.models.vit_pretrain import find_images
    from detkd.pipeline.spec import data_splits, ensure_synthetic_data, read_pipeline

    spec = read_pipeline(pipeline)
    if spec.data.synth is not None:
        ensure_synthetic_data(spec)
    train = data_splits(spec).train
    if train.images is None:
        raise ValueError(f"{pipeline}: data.train: --pipeline reads a COCO train split's image folder; use --images")
    return find_images(folder=train.images), f"{pipeline}: train split ({train.images})"
