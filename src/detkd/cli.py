"""The ``detkd`` command. User mistakes end in one clear line per problem and exit code 2."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from detkd.config import format_validation_error

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train teacher detectors and distill them into small low-resolution students (Ray + MLflow).",
)
data_app = typer.Typer(no_args_is_help=True, help="Synthesize, check and convert datasets.")
app.add_typer(data_app, name="data")
# A wide console when piped (CI logs, files) so the summary table keeps its run ids.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


class ConsoleHandler(logging.Handler):
    """The library's log records as users read them: plain lines on stdout, warnings plain on stderr,
    errors as ``error:`` lines (the consoles' streams are looked up per write, so CliRunner captures them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)
            return
        renderable = getattr(record, "renderable", None)  # a table logged with its text (the sweep's)
        if renderable is not None and record.levelno < logging.WARNING:
            console.print(renderable)
        elif record.levelno >= logging.ERROR:
            for line in message.splitlines() or [""]:
                err_console.print("[red]error:[/red] ", end="", highlight=False)
                err_console.print(line, highlight=False, markup=False, soft_wrap=True)
        else:
            target = err_console if record.levelno >= logging.WARNING else console
            target.print(message, highlight=False, markup=False, soft_wrap=True)


def install_log_handler() -> None:
    """One handler on the ``detkd`` logger, INFO and up; idempotent (every command calls it)."""
    logger = logging.getLogger("detkd")
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(ConsoleHandler())
    logger.setLevel(logging.INFO)


@app.callback()
def _setup() -> None:
    install_log_handler()


SetOption = Annotated[list[str] | None, typer.Option("--set", help="dotted override, e.g. input.scale=0.5")]
FreshOption = Annotated[
    bool, typer.Option("--fresh", help="start over: discard this run's checkpoints instead of resuming them")
]


def _user_errors() -> tuple[type[BaseException], ...]:
    from detkd.config import ConfigError
    from detkd.data.records import DatasetError
    from detkd.engine.coco_eval import EvaluationError
    from detkd.models.checkpoint import CheckpointError

    return ConfigError, DatasetError, EvaluationError, CheckpointError, FileNotFoundError


def _fail(exc: BaseException) -> None:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _local_model(ref: str | Path) -> Path:
    """A checkpoint path, or the checkpoint of a registered ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``
    (downloaded once per version into ~/.cache/detkd/models, or $DETKD_CACHE/models)."""
    text = str(ref)
    if not text.startswith("models:/"):
        return Path(text)
    import os

    from detkd.tracking.registry import registered_checkpoint
    from detkd.tracking.runs import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(None)
    check_tracking_uri(uri)
    cache = Path(os.environ.get("DETKD_CACHE", Path.home() / ".cache" / "detkd")) / "models"
    path, pinned = registered_checkpoint(text, tracking_uri=uri, cache_dir=cache)
    err_console.print(f"{text}: {pinned}", highlight=False)
    return path


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


@app.command("train")
def train(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    overrides: SetOption = None,
    summary: Annotated[Path | None, typer.Option(help="write a JSON summary row here")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="drop invalid records instead of refusing the data")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local Ray)")] = None,
    fresh: FreshOption = False,
) -> None:
    """Train a teacher or a plain student with Ray Train."""
    _train(config, overrides, summary, skip_invalid, address, fresh, distill=False)


@app.command("distill")
def distill(
    config: Annotated[Path, typer.Argument(help="run config YAML with a distill section")],
    overrides: SetOption = None,
    summary: Annotated[Path | None, typer.Option(help="write a JSON summary row here")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="drop invalid records instead of refusing the data")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local Ray)")] = None,
    fresh: FreshOption = False,
) -> None:
    """Distill frozen teachers into a student (one stage, or progressive stages) with Ray Train."""
    _train(config, overrides, summary, skip_invalid, address, fresh, distill=True)


def _train(config: Path, overrides, summary, skip_invalid: bool, address, fresh: bool, *, distill: bool) -> None:
    from detkd.config import ConfigError, load_config
    from detkd.engine.launch import run_training
    from detkd.engine.plan import open_split, stage_configs
    from detkd.pipeline.runner import evaluation_row, write_summary

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
        outcome = run_training(cfg, address=address, fresh=fresh)
    except _user_errors() as exc:
        _fail(exc)
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
            checkpoint, coco=coco, images=images, parquet=parquet, out=out, summary=summary,
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
    checkpoint, *, coco, images, parquet, out: Path | None, summary: Path | None, batch_size: int, score_thresh: float
) -> None:
    """``detkd evaluate MODEL --coco/--images|--parquet``: run a checkpoint over a split and score it."""
    from detkd.engine.coco_eval import METRIC_NAMES
    from detkd.pipeline.runner import write_summary
    from detkd.records import SummaryRow

    try:
        if checkpoint is None:
            raise FileNotFoundError("give --checkpoint with --coco/--images or --parquet, or --gt with --detections")
        from detkd.data import open_source
        from detkd.engine.evaluate import evaluate_checkpoint
        from detkd.models.checkpoint import atomic_write_bytes

        source = open_source(coco=coco, images=images, parquet=parquet)
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
    console.print(
        f"{format}: {out} ({out.stat().st_size / 1e6:.1f} MB; boxes within "
        f"{result.max_box_difference_px:.2g} px of PyTorch on a probe image)"
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


@app.command("run")
def run(
    pipeline: Annotated[Path, typer.Argument(help="pipeline spec YAML")],
    overrides: SetOption = None,
    summary: Annotated[Path | None, typer.Option(help="write the summary rows as JSON here")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local Ray)")] = None,
    fresh: FreshOption = False,
    parallel: Annotated[
        int,
        typer.Option(
            min=1, help="train up to N independent steps at once when the cluster has room (default: one at a time)"
        ),
    ] = 1,
) -> None:
    """Run a pipeline spec: data -> teachers -> students -> evaluation (see `detkd plan` for its steps)."""
    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import PipelineFailed, run_pipeline, summary_table, write_summary

    try:
        spec = load_pipeline(pipeline, overrides or [])
        rows = run_pipeline(spec, address=address, fresh=fresh, parallel=parallel)
    except _user_errors() as exc:
        _fail(exc)
    except PipelineFailed as exc:
        for name, error in exc.execution.failed.items():
            if not isinstance(error, _user_errors()):  # a bug or a crash: its traceback, not only its message
                import traceback

                err_console.print(f"step {name}:", highlight=False)
                err_console.print("".join(traceback.format_exception(error)), highlight=False, markup=False)
        for line in str(exc).splitlines():
            err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(summary_table(rows))
    if summary:
        write_summary(rows, summary)
        console.print(f"summary: {summary}")


@app.command("plan")
def plan(
    pipeline: Annotated[Path, typer.Argument(help="pipeline spec YAML")],
    overrides: SetOption = None,
    png: Annotated[Path | None, typer.Option(help="where to draw the DAG (default: <workdir>/plan.png)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the steps as JSON instead of text")] = False,
) -> None:
    """Show a pipeline's steps, what each needs and which can run together (text and a PNG); trains nothing."""
    from detkd.pipeline.dag import build_dag, dag_png, format_dag
    from detkd.pipeline.load import load_pipeline

    try:
        spec = load_pipeline(pipeline, overrides or [])
        dag = build_dag(spec)
    except _user_errors() as exc:
        _fail(exc)
    picture = dag_png(dag, png or spec.workdir / "plan.png")
    if as_json:
        print(json.dumps(dag.to_dict() | {"png": str(picture)}, indent=2))
        return
    console.print(format_dag(dag), highlight=False, markup=False)
    console.print(f"picture: {picture}", highlight=False)


@app.command("compile")
def compile_command(
    pipeline: Annotated[Path, typer.Argument(help="pipeline spec YAML")],
    out: Annotated[Path, typer.Option(help="the KFP pipeline (IR YAML) to write")],
    overrides: SetOption = None,
    spec_path: Annotated[
        str | None, typer.Option(help="the spec's path as the tasks see it (default: PIPELINE as given)")
    ] = None,
    ray_address: Annotated[
        str, typer.Option(help="Ray dashboard the model steps submit their training to (default: in their pod)")
    ] = "",
) -> None:
    """Compile a pipeline spec into a Kubeflow Pipelines v2 pipeline whose tasks are its steps (needs the kfp extra)."""
    from detkd.pipeline.dag import build_dag
    from detkd.pipeline.load import load_pipeline

    try:
        from detkd.cluster.kubeflow import compile_pipeline
    except ImportError as exc:
        extra = "pip install -c constraints.txt -e '.[kfp]'"
        _fail(FileNotFoundError(f"detkd compile needs the kfp extra: {extra} ({exc})"))
    try:
        dag = build_dag(load_pipeline(pipeline, overrides or []))
        written = compile_pipeline(
            dag, out, spec=spec_path or str(pipeline), overrides=list(overrides or []), ray_address=ray_address
        )
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"compiled {len(dag.steps)} steps of {dag.pipeline} into {written}", highlight=False)


@app.command("step")
def step_command(
    pipeline: Annotated[Path, typer.Argument(help="pipeline spec YAML")],
    step: Annotated[str, typer.Argument(help="the step to run (see `detkd plan`)")],
    overrides: SetOption = None,
    pipeline_run: Annotated[
        str | None, typer.Option(help="the pipeline's MLflow run (the data step's output; it opens one without)")
    ] = None,
    outputs: Annotated[Path | None, typer.Option(help="also write the step's outputs here as JSON")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local Ray)")] = None,
    fresh: FreshOption = False,
) -> None:
    """Run one step of a pipeline (what each Kubeflow component runs); the steps it needs must have finished."""
    from detkd.pipeline.load import load_pipeline
    from detkd.pipeline.runner import PipelineFailed
    from detkd.pipeline.step import run_step

    try:
        spec = load_pipeline(pipeline, overrides or [])
        result = run_step(spec, step, pipeline_run=pipeline_run, address=address, fresh=fresh)
    except _user_errors() as exc:
        _fail(exc)
    except PipelineFailed as exc:
        for line in str(exc).splitlines():
            err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    from detkd.pipeline.step import OUTPUTS_MARKER

    text = json.dumps(result, default=str)
    if outputs:
        outputs.parent.mkdir(parents=True, exist_ok=True)
        outputs.write_text(text + "\n")
    print(f"{OUTPUTS_MARKER}{text}", flush=True)  # one line a caller (a Kubeflow component) can find


@app.command("tune")
def tune_command(
    space: Annotated[Path, typer.Argument(help="search space YAML (search_spaces/*.yaml)")],
    samples: Annotated[
        int | None, typer.Option(min=1, help="trials to draw (random/optuna) or repeats of the grid (grid)")
    ] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="trials running at once")] = None,
    scheduler: Annotated[str | None, typer.Option(help="asha (stops weak trials early) or fifo")] = None,
    search: Annotated[str | None, typer.Option(help="random, grid or optuna")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local Ray)")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the interrupted sweep (the same command again does too)")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="discard the sweep's folder and start over")] = False,
) -> None:
    """Ray Tune sweep: one Ray Train run per trial, ranked on val, the chosen one scored on test."""
    from detkd.sweeps.space import load_space
    from detkd.sweeps.tuner import SweepFailed, SweepOptions, run_sweep

    if resume and fresh:
        _fail(ValueError("--resume and --fresh contradict each other"))
    try:
        loaded = load_space(space)
        options = SweepOptions.from_budget(
            loaded.space.budget,
            samples=samples,
            max_concurrent=max_concurrent,
            scheduler=scheduler,
            search=search,
        )
        outcome = run_sweep(loaded, options=options, address=address, resume=resume, fresh=fresh)
    except _user_errors() as exc:
        _fail(exc)
    except ValidationError as exc:
        _fail(ValueError(format_validation_error(exc, "detkd tune")))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except SweepFailed as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"results: {outcome.workdir} (trials.parquet, best_config.yaml, plots/)")


jobs_app = typer.Typer(no_args_is_help=True, help="Inspect and control jobs on a Ray cluster.")
app.add_typer(jobs_app, name="jobs")
AddressOption = Annotated[str, typer.Option(envvar="RAY_JOBS_ADDRESS", help="Ray dashboard, e.g. http://HOST:8265")]


@app.command("submit")
def submit(
    spec: Annotated[Path, typer.Argument(help="pipeline spec or run config inside this project")],
    address: AddressOption,
    overrides: SetOption = None,
    follow: Annotated[bool, typer.Option(help="stream the logs; exit non-zero if the job fails")] = False,
    env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE environment for the job")] = None,
    parallel: Annotated[
        int | None, typer.Option(min=1, help="pipelines: train up to N independent steps at once on the cluster")
    ] = None,
    step: Annotated[str | None, typer.Option(help="pipelines: run only this step there (`detkd step`)")] = None,
    pipeline_run: Annotated[str | None, typer.Option(help="with --step: the pipeline's MLflow run")] = None,
) -> None:
    """Submit a pipeline or a run to a Ray cluster (Ray Jobs API)."""
    from detkd.cluster import jobs

    try:
        extra = dict(item.split("=", 1) for item in env or [] if "=" in item)
        if env and len(extra) != len(env):
            raise FileNotFoundError("--env takes KEY=VALUE")
        root = jobs.find_project_root(spec.parent if spec.exists() else Path.cwd())
        job_id = jobs.submit(
            spec,
            address=address,
            project_root=root,
            overrides=overrides or [],
            extra_env=extra,
            parallel=parallel,
            step=step,
            pipeline_run=pipeline_run,
        )
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"submitted job [bold]{job_id}[/bold] to {address}")
    print(job_id, flush=True)
    if follow:
        status = jobs.follow(job_id, address=address)
        console.print(f"job {job_id}: {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(address: AddressOption) -> None:
    """Jobs on the cluster, newest last; a pipeline's steps as ``finished/all``."""
    from rich.table import Table

    from detkd.cluster import jobs
    from detkd.pipeline.events import summary

    try:
        found = jobs.client(address).list_jobs()
    except _user_errors() as exc:
        _fail(exc)
    table = Table()
    for column in ("submission_id", "status", "steps", "entrypoint"):
        table.add_column(column)
    for job in sorted(found, key=lambda j: j.start_time or 0):
        steps = jobs.steps_of(job, address=address) if job.submission_id else None
        table.add_row(str(job.submission_id), str(job.status.value), summary(steps) if steps else "", job.entrypoint)
    console.print(table)


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOption) -> None:
    """One job's status, and each step's state for a pipeline; exit 1 if it failed or was stopped."""
    from detkd.cluster import jobs

    try:
        info = jobs.client(address).get_job_info(job_id)
        steps = jobs.steps_of(info, address=address)
    except _user_errors() as exc:
        _fail(exc)
    status = str(info.status.value)
    console.print(status)
    if steps is not None:
        console.print(_steps_table(steps))
    if status in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


def _steps_table(states):
    from rich.table import Table

    table = Table()
    for column in ("step", "state", "seconds", "error"):
        table.add_column(column)
    for state in states:
        seconds = f"{state.seconds:.1f}" if state.seconds is not None else ""
        table.add_row(state.step, state.state, seconds, state.error)
    return table


@jobs_app.command("logs")
def jobs_logs(
    job_id: str, address: AddressOption, follow: Annotated[bool, typer.Option(help="stream until the job ends")] = False
) -> None:
    """A job's logs."""
    from detkd.cluster import jobs

    if follow:
        status = jobs.follow(job_id, address=address)
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)
    sys.stdout.write(jobs.client(address).get_job_logs(job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOption) -> None:
    """Ask a running job to stop."""
    from detkd.cluster import jobs

    stopped = jobs.client(address).stop_job(job_id)
    console.print(f"job {job_id}: {'stop requested' if stopped else 'not running'}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted: rerun the same command to resume from the last checkpoint")
        sys.exit(130)


if __name__ == "__main__":
    sys.exit(main())
