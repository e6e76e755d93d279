"""MLflow lineage: runs, parameters, metrics, datasets, models (the only MLflow importer).

Default store: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``,
so nothing needs a server; ``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``)
points at a real server for clusters. The driver owns the run (``run_context``);
Ray workers log into it by id through :class:`RunLogger` (rank 0 only).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from detkd.config import ConfigError
from detkd.extras import require
from detkd.tracking.redact import redact, redact_value

TAG_PREFIX = "detkd."
# MLflow 3 opens experiments without this tag on its GenAI overview (traces, token usage).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
REACHABLE_TIMEOUT_S = 5.0


class TrackingUnreachable(ConfigError):
    """The tracking store cannot be used; raised before any training starts."""


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The store to log to: ``explicit``, else MLFLOW_TRACKING_URI, else ./mlflow.db. A relative SQLite
    path becomes absolute here, in the driver: Ray workers run in other folders and would open (and
    create) a different, empty store."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    database = sqlite_file(uri)
    return uri if database is None else f"sqlite:///{database}"


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store, absolute (a relative one is relative to this process's
    folder); None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///")).absolute()


@functools.cache
def code_version_tags() -> dict[str, str]:
    """``version`` of detkd and, when it runs from a git checkout, its ``git_commit`` (+ ``-dirty``)."""
    import subprocess

    import detkd

    tags = {"version": detkd.__version__}
    source = Path(detkd.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        tags["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass  # an installed wheel, or no git: the version alone
    return tags


_checked: set[str] = set()


def check_tracking_uri(tracking_uri: str) -> None:
    """Fail in seconds, naming the URI, when the tracking store is unusable.

    MLflow's own client retries an unreachable server for minutes and then prints a long
    traceback; this asks a server's ``/health`` once with a short timeout (and checks that a
    SQLite file's folder exists) before Ray or any training starts.
    """
    if tracking_uri in _checked:
        return
    if tracking_uri.startswith(("postgresql://", "postgresql+psycopg://")):  # SQLAlchemy's driver: psycopg 3
        require("server", "psycopg", why=f"MLflow tracking store {redact(tracking_uri)}")
    if tracking_uri.startswith(("http://", "https://")):
        check_server(tracking_uri)
    elif (database := sqlite_file(tracking_uri)) is not None:
        folder = database.parent
        if not folder.is_dir():
            raise TrackingUnreachable(f"MLflow tracking store {tracking_uri}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise TrackingUnreachable(f"MLflow tracking store {tracking_uri}: the folder {folder} is not writable")
    _checked.add(tracking_uri)


def check_server(tracking_uri: str) -> None:
    """Ask an ``http(s)://`` tracking server's ``/health`` once, with a short timeout; TrackingUnreachable
    when it does not answer or answers 5xx."""
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=REACHABLE_TIMEOUT_S) as response:
            response.read(64)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingUnreachable(
                f"MLflow tracking server {redact(tracking_uri)} answered {exc.code} on /health; "
                "check the server (MLFLOW_TRACKING_URI or tracking.tracking_uri)"
            ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(tracking_uri)} is unreachable ({reason}); start it, or point "
            "MLFLOW_TRACKING_URI / tracking.tracking_uri at a running one (unset: a local mlflow.db)"
        ) from None


def experiment_id(tracking_uri: str, name: str) -> str:
    """Get or create the experiment; local stores keep artifacts beside the database."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if any(found.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # made before detkd tagged them
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(found.experiment_id, key, value)
        check_artifact_client(found.artifact_location, name)
        return found.experiment_id
    location = None
    if (database := sqlite_file(tracking_uri)) is not None:
        location = (database.parent / "mlartifacts").as_uri()
    try:
        created = client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:  # created concurrently
        created = client.get_experiment_by_name(name).experiment_id
    check_artifact_client(client.get_experiment(created).artifact_location, name)
    return created


def check_artifact_client(location: str, experiment: str) -> None:
    """MLflow writes an ``s3://`` artifact root from this process with boto3 (a server's proxied
    ``mlflow-artifacts:`` root needs nothing): say so before a run starts rather than at its first file."""
    if location.startswith("s3://"):
        require("server", "boto3", why=f"the artifacts of experiment {experiment!r} in {redact(location)}")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def start_run(
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> str:
    """Create a run (``detkd.``-prefixed, redacted ``tags``; a child of ``parent_run_id``), or set
    ``resume_run_id`` RUNNING again with those tags; its id."""
    mlflow.set_tracking_uri(tracking_uri)
    exp_id = experiment_id(tracking_uri, experiment)
    all_tags = {f"{TAG_PREFIX}{k}": redact(str(v)) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    client = MlflowClient(tracking_uri)
    if resume_run_id:
        client.update_run(resume_run_id, status="RUNNING")
        RunLogger(tracking_uri=tracking_uri, run_id=resume_run_id).tags(all_tags)
        return resume_run_id
    return client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id


@contextlib.contextmanager
def run_context(
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[str]:
    """Start (or nest, or resume) an MLflow run; yields its id, marks FAILED/KILLED on error.
    (A training run's driver uses ``buffered.buffered_run``: the same, without waiting for the server.)"""
    run_id = start_run(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        tags=tags,
        parent_run_id=parent_run_id,
        resume_run_id=resume_run_id,
    )
    client = MlflowClient(tracking_uri)
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status=status)


def param_items(params: dict[str, Any]) -> list[tuple[str, str]]:
    """A nested dict as MLflow params: dotted keys, redacted values cut to MLflow's 6000 characters."""
    return [(k, redact(str(v))[:6000]) for k, v in flatten(params).items()]


def tag_items(tags: dict[str, Any]) -> list[tuple[str, str]]:
    """Tags as logged: ``detkd.`` before keys that carry neither it nor ``mlflow.``; redacted values."""
    return [
        (f"{TAG_PREFIX}{k}" if not k.startswith(("mlflow.", TAG_PREFIX)) else k, redact(str(v)))
        for k, v in tags.items()
    ]


class RunLogger:
    """Log into an existing run by id from any process, waiting for the store (a training run's
    driver and rank-0 worker use ``buffered.BufferedLogger``, which does not wait)."""

    def __init__(self, *, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    def params(self, params: dict[str, Any]) -> None:
        items = [Param(k, v) for k, v in param_items(params)]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, metrics: dict[str, float], *, step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, v) for k, v in tag_items(tags)]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def dict(self, data: Any, name: str) -> None:
        self.client.log_dict(self.run_id, redact_value(data), name)

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, redact(text), name)


def pandas_dataset(records: list[dict[str, Any]], *, source: str, name: str | None = None):
    """An MLflow dataset of image records; its digest depends on the records alone."""
    import pandas as pd

    with warnings.catch_warnings():  # MLflow's source-type and integer-column hints are noise here
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(pd.DataFrame.from_records(records), source=source, name=name)


def dataset_digest(records: list[dict[str, Any]]) -> str:
    """MLflow's digest of a split's image records: the one ``log_dataset`` records for the same data."""
    return pandas_dataset(records, source="digest").digest


def log_dataset(
    *, tracking_uri: str, run_id: str, records: list[dict[str, Any]], source: str, name: str, context: str
) -> str:
    """Record a dataset input (digest of its image records) on the run for lineage."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    fields = dataset_fields(records, source=source, name=name)
    MlflowClient(tracking_uri).log_inputs(
        run_id, datasets=[DatasetInput(dataset=Dataset(**fields), tags=[InputTag("mlflow.data.context", context)])]
    )
    return fields["digest"]


def dataset_fields(records: list[dict[str, Any]], *, source: str, name: str) -> dict[str, Any]:
    """The fields of the MLflow dataset entity of ``records`` (name, digest, source, schema, profile)."""
    dataset = pandas_dataset(records, source=source, name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        entity = dataset._to_mlflow_entity()
    keys = ("name", "digest", "source_type", "source", "schema", "profile")
    return {key: getattr(entity, key) for key in keys}


def detector_signature():
    """Encoded images in; per image boxes, scores, category ids and names out; two inference params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from detkd.tracking.pyfunc_model import DEFAULT_MAX_DETECTIONS, DEFAULT_SCORE_THRESHOLD

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec(Array(Array("double")), "boxes"),
                ColSpec(Array("double"), "scores"),
                ColSpec(Array("long"), "category_ids"),
                ColSpec(Array("string"), "names"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("score_threshold", "double", DEFAULT_SCORE_THRESHOLD),
                ParamSpec("max_detections", "long", DEFAULT_MAX_DETECTIONS),
            ]
        ),
    )


def example_image(size: int) -> bytes:
    """A PNG of a square on grey, ``size`` px: the logged model's input example."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (118, 118, 118))
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, size // 2, size // 2], fill=(220, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def log_detector_model(
    *, tracking_uri: str, run_id: str, checkpoint: Path, example_size: int, name: str = "model"
) -> str:
    """Log a detkd checkpoint as an MLflow pyfunc built from code (``detkd.tracking.pyfunc_model``); returns its URI.

    Nothing in it is pickled: MLflow runs the model file on load, which reads the checkpoint
    with ``weights_only=True``.
    """
    import pandas as pd
    import torch
    import torchvision

    import detkd
    import detkd.tracking.pyfunc_model as model_code
    from detkd.tracking.pyfunc_model import CHECKPOINT_ARTIFACT

    mlflow.set_tracking_uri(tracking_uri)
    status = MlflowClient(tracking_uri).get_run(run_id).info.status  # a finished run is logged into, then restored
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"detkd=={detkd.__version__}",
        f"mlflow=={mlflow.__version__}",
        "pandas",
        "pillow",
        *network_requirements(checkpoint),
    ]
    with mlflow.start_run(run_id=run_id, nested=True) as active, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLflow's hints about example formats are noise here
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=model_code.__file__,
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            signature=detector_signature(),
            input_example=pd.DataFrame({"image": [example_image(example_size)]}),
            pip_requirements=requirements,
        )
    # start_run(run_id) ends the run on exit; give it back the status it had (its owner finishes a running one).
    MlflowClient(tracking_uri).update_run(active.info.run_id, status=status)
    return info.model_uri


def network_requirements(checkpoint: Path) -> list[str]:
    """What the checkpoint's network needs beyond torch: transformers (pinned as installed) for ``arch: hf``.
    (An MMDetection model's mmcv must be built against torch: its environment is made by
    ``scripts/install_mmdet.sh``, not by pip from these requirements.)"""
    from detkd.models.checkpoint import read_checkpoint_meta

    if read_checkpoint_meta(Path(checkpoint)).model.get("arch") != "hf":
        return []
    from importlib.metadata import version

    return [f"transformers=={version('transformers')}", f"safetensors=={version('safetensors')}"]


def download_checkpoint(*, run_id: str, tracking_uri: str | None, dest: Path) -> Path:
    """Fetch a run's ``checkpoint/model.pt`` (and its checksum) into ``dest``."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"teacher mlflow:{run_id}: no such MLflow run ({exc.message.splitlines()[0]})") from None
    dest.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(run_id, "checkpoint", str(dest)))
    path = local / "model.pt"
    if not path.is_file():
        raise ConfigError(f"teacher mlflow:{run_id}: the run has no checkpoint/model.pt artifact")
    return path


def find_runs(tracking_uri: str, experiment: str, tags: dict[str, str]) -> list[Any]:
    """Runs of ``experiment`` carrying all ``tags`` (newest first); [] if the experiment does not exist."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([found.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])


def max_metric(tracking_uri: str, run_id: str, key: str) -> float | None:
    """The largest value a run logged for ``key`` (None if it never did)."""
    history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return max((m.value for m in history), default=None)


def child_runs(tracking_uri: str, run_id: str) -> list[Any]:
    """The runs whose parent is ``run_id`` (in the parent's experiment)."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(run_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")


def close_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Give a run that did not finish (e.g. a trial ASHA stopped: its process was ended mid-epoch,
    so it reads RUNNING or FAILED) its real ``status``, and its unfinished children too."""
    client = MlflowClient(tracking_uri)
    for child in child_runs(tracking_uri, run_id):
        if child.info.status != "FINISHED":
            close_run(tracking_uri, child.info.run_id, status)
    if client.get_run(run_id).info.status != "FINISHED":
        client.set_terminated(run_id, status=status)


def open_parent_run(tracking_uri: str, experiment: str, *, run_name: str, tags: dict[str, str]) -> str:
    """A run left RUNNING for others to join as children (a pipeline's steps may be other processes);
    ``tags`` get the ``detkd.`` prefix and are redacted."""
    run = MlflowClient(tracking_uri).create_run(
        experiment_id(tracking_uri, experiment),
        run_name=run_name,
        tags={f"{TAG_PREFIX}{k}": redact(str(v)) for k, v in tags.items()},
    )
    return run.info.run_id


def check_reachable(tracking_uri: str) -> None:
    """:func:`check_server` for ``http(s)://`` stores, every time (``check_tracking_uri`` asks once per
    process): a server that went away since the start fails in seconds, not after MLflow's minutes."""
    if tracking_uri.startswith(("http://", "https://")):
        check_server(tracking_uri)


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark a run terminated with ``status`` (FINISHED, FAILED or KILLED); TrackingUnreachable at once
    when the server went away (:func:`check_reachable`)."""
    check_reachable(tracking_uri)
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def run_start_time(tracking_uri: str, run_id: str) -> float:
    """When a run started, in seconds since the epoch."""
    return MlflowClient(tracking_uri).get_run(run_id).info.start_time / 1000


def artifact_uri(tracking_uri: str, run_id: str) -> str:
    """Where a run's artifacts are stored (named when writing them fails)."""
    return MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri
