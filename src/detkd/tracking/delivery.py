"""Send outbox records to MLflow, tell an unreachable server from a refusal, and replay a kept outbox.

An unreachable server (connection refused or reset, a timeout, HTTP 429 or 5xx) is worth waiting
for: the records stay kept. Anything else the store answers (a bad request, a missing run) is a
refusal: retrying cannot help, so it is reported, not kept. Only ``http(s)://`` stores can be
unreachable; a local store's errors are refusals, and an OSError (a full disk under a local
artifact store) is raised as it is.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from detkd.tracking.outbox import Outbox, OutboxError, Record, describe, outbox_folder, read_meta

log = logging.getLogger(__name__)
BATCH_METRICS = 1000  # MLflow's log_batch limit
PROBE_TIMEOUT_S = 2.0
# MLflow reads these per request from os.environ: one setting per process. Set (unless the user set them)
# only in processes whose MLflow traffic is the outbox's: a Ray Train worker, `detkd tracking replay`.
DELIVERY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingNotDelivered(RuntimeError):
    """Records a run logged did not reach the tracking server; they are kept for ``detkd tracking replay``
    (the CLI ends with exit code 1: the training itself finished and kept its work)."""


def delivery_env() -> None:
    """Short MLflow HTTP retries and timeouts for this process (the outbox retries on its own)."""
    for key, value in DELIVERY_ENV.items():
        os.environ.setdefault(key, value)


def remote(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def unreachable(exc: BaseException, tracking_uri: str) -> bool:
    """Whether ``exc`` says the server did not answer (keep and retry), rather than refused (report)."""
    if not remote(tracking_uri):
        return False
    import requests
    import urllib3
    from mlflow.exceptions import MlflowException, RestException

    network = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.RetryError,
        urllib3.exceptions.HTTPError,
        ConnectionError,
        TimeoutError,
    )
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, network) and not isinstance(error, requests.HTTPError):
            return True
        status = None
        if isinstance(error, requests.HTTPError) and error.response is not None:
            status = error.response.status_code
        elif isinstance(error, RestException) or (
            isinstance(error, MlflowException) and str(error.message).startswith("API request to")
        ):  # the server's answer, or MLflow's word for no answer; not an error of this process
            status = error.get_http_status_code()
        if status is not None:
            return status == 429 or status >= 500
        error = error.__cause__ or error.__context__
    return False


def answers(tracking_uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A quick ``/health`` look: False only when the server did not answer or answered 429/5xx."""
    if not remote(tracking_uri):
        return True
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read(64)
    except urllib.error.HTTPError as exc:
        return not (exc.code == 429 or exc.code >= 500)
    except urllib.error.URLError as exc:
        return not isinstance(exc.reason, (ConnectionError, TimeoutError, socket.gaierror))
    except (ConnectionError, TimeoutError):
        return False
    return True


def next_batch(records: list[Record]) -> list[Record]:
    """The head record, with the metric records of the same run right after it (one log_batch, in order)."""
    if not records:
        return []
    batch, values = [records[0]], len(records[0].data.get("metrics", ()))
    if records[0].kind != "metrics":
        return batch
    for record in records[1:]:
        if record.kind != "metrics" or record.run_id != batch[0].run_id:
            break
        size = len(record.data["metrics"])
        if values + size > BATCH_METRICS:
            break
        batch.append(record)
        values += size
    return batch


def deliver(client, tracking_uri: str, batch: list[Record]) -> None:
    """Log ``batch`` (from :func:`next_batch`) through ``client``; raises what MLflow raises."""
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

    from detkd.tracking.runs import log_detector_model

    head = batch[0]
    run_id, data = head.run_id, head.data
    if head.kind == "metrics":
        metrics = [Metric(k, float(v), int(t), int(s)) for r in batch for k, v, t, s in r.data["metrics"]]
        client.log_batch(run_id, metrics=metrics)
    elif head.kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in data["params"]])
    elif head.kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in data["tags"]])
    elif head.kind == "artifact":
        client.log_artifact(run_id, str(head.file), data.get("artifact_path"))
    elif head.kind == "dict":
        client.log_dict(run_id, data["data"], data["name"])
    elif head.kind == "text":
        client.log_text(run_id, data["text"], data["name"])
    elif head.kind == "dataset":
        entity = DatasetEntity(**data["dataset"])
        client.log_inputs(run_id, datasets=[DatasetInput(entity, [InputTag("mlflow.data.context", data["context"])])])
    elif head.kind == "model":
        log_detector_model(
            tracking_uri=tracking_uri,
            run_id=run_id,
            checkpoint=head.file,
            example_size=int(data["example_size"]),
            name=data.get("name", "model"),
        )
    elif head.kind == "end":
        client.set_terminated(run_id, status=data["status"], end_time=data.get("end_time"))
    else:  # Record.from_line admits only KINDS
        raise ValueError(f"unknown tracking record kind {head.kind!r}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass
class Replayed:
    """What :func:`replay` delivered and what the store refused."""

    tracking_uri: str
    run_ids: list[str]
    delivered: str
    refused: list[str] = field(default_factory=list)


def replay_target(folder: Path, tracking_uri: str | None) -> tuple[Outbox, str, list[Record]]:
    """The outbox in ``folder`` (a run folder or the outbox itself), its URI, and its checked records."""
    box = outbox_folder(folder)
    if not (box / "records.jsonl").is_file():
        raise OutboxError(f"{box / 'records.jsonl'}: no tracking outbox here (nothing was kept, or it was delivered)")
    meta = read_meta(box)
    uri = tracking_uri or meta.get("tracking_uri")
    if not uri:
        raise OutboxError(f"{box / 'meta.json'}: no tracking_uri recorded; give --tracking-uri")
    if not tracking_uri and meta.get("uri_redacted"):
        raise OutboxError(f"{box / 'meta.json'}: the recorded URI {uri} hid its password; give --tracking-uri")
    outbox = Outbox(box, tracking_uri=uri)
    return outbox, uri, outbox.check()


def replay(folder: Path, *, tracking_uri: str | None = None) -> Replayed:
    """Deliver a kept outbox in order, counting each delivery in its folder (a replay that stops
    continues where it stopped); removes it when everything arrived. A server that does not answer
    raises TrackingNotDelivered with the rest still kept; refused records are skipped and returned."""
    from mlflow.tracking import MlflowClient

    from detkd.tracking.redact import redact

    outbox, uri, records = replay_target(folder, tracking_uri)
    delivery_env()
    client = MlflowClient(uri)
    run_ids = list(dict.fromkeys(r.run_id for r in records))
    delivered: list[Record] = []
    refused: list[str] = []
    while records:
        batch = next_batch(records)
        try:
            deliver(client, uri, batch)
        except Exception as exc:
            if unreachable(exc, uri):
                raise TrackingNotDelivered(
                    f"tracking server {redact(uri)} unreachable ({first_line(exc)}): {describe(records)} not "
                    f"delivered{' after ' + describe(delivered) if delivered else ''}; still kept in "
                    f"{outbox.folder}; run the same command again when the server answers"
                ) from None
            if isinstance(exc, OSError):
                raise
            refused.append(f"{describe(batch)} of run {batch[0].run_id}: {first_line(exc)}")
        else:
            delivered.extend(batch)
        outbox.done(len(batch))
        records = records[len(batch) :]
    return Replayed(redact(uri), run_ids, describe(delivered), refused)
