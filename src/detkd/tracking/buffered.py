"""Log into an MLflow run without waiting for the server: calls keep records, a thread delivers them.

:class:`BufferedLogger` has :class:`~detkd.tracking.runs.RunLogger`'s methods; each returns at once.
A background thread sends the records in order. While the server does not answer, they are kept
(:class:`~detkd.tracking.outbox.Outbox`: memory, then a file under the run folder) and the thread
looks every few seconds whether it answers again. A refusal (a bad request) is reported, not kept.
Closing waits for the rest while the server answers, and gives up ``timeout`` seconds after it stopped
answering; whatever is left stays in the outbox for ``detkd tracking replay``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detkd.tracking.delivery import (
    TrackingNotDelivered,
    answers,
    deliver,
    first_line,
    next_batch,
    unreachable,
)
from detkd.tracking.outbox import OUTBOX_DIR, Outbox, OutboxError, Record, describe, read_meta
from detkd.tracking.redact import redact, redact_value

log = logging.getLogger(__name__)
HEAD = 64  # records looked at per delivery (metric records of one run go in one log_batch)
RETRY_S = (2.0, 5.0)  # first and longest wait between looks at a server that does not answer
CLOSE_TIMEOUT_S = 10.0  # how long a run's end waits for a server that stopped answering
LONGEST_CLOSE_S = 600.0  # and for one that answers /health but not the delivery


@dataclass
class DeliveryReport:
    """What a closed logger left undelivered (``pending``), and what the store refused."""

    tracking_uri: str
    folder: Path
    run_ids: list[str]
    pending: str
    count: int
    since: float | None
    refused: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.count and not self.refused

    def message(self, run_folder: Path) -> str:
        """One line: what did not arrive, where it is kept and the command that delivers it."""
        parts = []
        runs = ", ".join(self.run_ids) or "?"
        if self.count:
            since = f" since {time.strftime('%H:%M:%S', time.localtime(self.since))}" if self.since else ""
            parts.append(
                f"tracking server {redact(self.tracking_uri)} unreachable{since}: {self.pending} not delivered to "
                f"run {runs}; kept in {self.folder}; deliver them with: detkd tracking replay {run_folder}"
            )
        if self.refused:
            more = f" (and {len(self.refused) - 1} more)" if len(self.refused) > 1 else ""
            parts.append(f"the tracking store refused {self.refused[0]}{more}; not retried")
        return "; ".join(parts)


class BufferedLogger:
    """RunLogger's methods for one run, none of which waits for the tracking server (see the module).

    ``folder`` is where records go past ``memory_limit`` (made only then). A full disk there raises
    OSError from the logging call that spilled; one from delivery (a local artifact store) from close().
    """

    def __init__(self, *, tracking_uri: str, run_id: str, folder: Path, memory_limit: int = 1000) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.outbox = Outbox(folder, tracking_uri=tracking_uri, memory_limit=memory_limit)
        kept_for = self.outbox.meta().get("tracking_uri")
        if kept_for and kept_for != redact(tracking_uri):
            raise OutboxError(
                f"{self.outbox.folder}: holds records for tracking server {kept_for}, not {redact(tracking_uri)}; "
                f"deliver them first: detkd tracking replay {self.outbox.folder}"
            )
        self.client = MlflowClient(tracking_uri)
        self.changed = threading.Condition(self.outbox.lock)
        self.stopping = False
        self.since: float | None = None  # when the server stopped answering (None: it answers)
        self.busy = False  # a delivery is under way
        self.hurry = False  # close() is waiting: look at a silent server now, not after the retry wait
        self.singles = 0  # deliver this many records one by one (to find the one a refused batch held)
        self.refused: list[str] = []
        self.fatal: OSError | None = None  # from delivery: raised by the owner's next call
        self.failure: BaseException | None = None  # the sender thread's own crash: raised by close()
        self.carried_since: float | None = None
        self.thread = threading.Thread(target=self._send, name=f"mlflow-outbox-{run_id[:8]}", daemon=True)
        self.thread.start()

    # -- RunLogger's methods ---------------------------------------------------------------------------

    def _keep(self, kind: str, data: dict[str, Any], file: Path | None = None) -> None:
        if self.fatal is not None:
            raise self.fatal
        with self.changed:
            self.outbox.append(Record(kind, self.run_id, data, file))
            self.changed.notify_all()

    def params(self, params: dict[str, Any]) -> None:
        from detkd.tracking.runs import param_items

        items = param_items(params)
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            self._keep("params", {"params": items[i : i + 100]})

    def metrics(self, metrics: dict[str, float], *, step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [[k, float(v), now, step or 0] for k, v in metrics.items() if v is not None]
        if items:
            self._keep("metrics", {"metrics": items})

    def tags(self, tags: dict[str, Any]) -> None:
        from detkd.tracking.runs import tag_items

        items = tag_items(tags)
        for i in range(0, len(items), 100):
            self._keep("tags", {"tags": items[i : i + 100]})

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._keep("artifact", {"artifact_path": artifact_path}, Path(path).absolute())

    def dict(self, data: Any, name: str) -> None:
        self._keep("dict", {"data": redact_value(data), "name": name})

    def text(self, text: str, name: str) -> None:
        self._keep("text", {"text": redact(text), "name": name})

    def dataset(self, *, records: list[dict[str, Any]], source: str, name: str, context: str) -> str:
        """Record a split's image records as a dataset input of the run; returns its digest at once."""
        from detkd.tracking.runs import dataset_fields

        fields = dataset_fields(records, source=source, name=name)
        self._keep("dataset", {"dataset": fields, "context": context})
        return fields["digest"]

    def model(self, checkpoint: Path, *, example_size: int, name: str = "model") -> None:
        """Log ``checkpoint`` as the run's pyfunc model (``runs.log_detector_model``)."""
        self._keep("model", {"example_size": example_size, "name": name}, Path(checkpoint).absolute())

    def end(self, status: str) -> None:
        """The run's end: FINISHED, FAILED or KILLED."""
        self._keep("end", {"status": status, "end_time": int(time.time() * 1000)})

    # -- delivery --------------------------------------------------------------------------------------

    def _send(self) -> None:
        try:
            self._deliver_until_stopped()
        except BaseException as exc:  # a bug here must not pass for an outage: close() raises it
            with self.changed:
                self.failure = exc
                self.changed.notify_all()

    def _deliver_until_stopped(self) -> None:
        wait = RETRY_S[0]
        while True:
            with self.changed:
                while not self.stopping and (self.fatal is not None or not self.outbox.pending()):
                    self.changed.wait()
                if self.stopping:
                    return
                batch = next_batch(self.outbox.head(1 if self.singles else HEAD))
                down, hurried = self.since is not None, self.hurry
            if down and not answers(self.tracking_uri):  # no lock held: loggers never wait for this
                retry_at = time.monotonic() + (0.5 if hurried else wait)
                with self.changed:
                    while not self.stopping and self.hurry == hurried and time.monotonic() < retry_at:
                        self.changed.wait(retry_at - time.monotonic())
                wait = min(wait * 1.5, RETRY_S[1])
                continue
            with self.changed:
                self.busy = True
            error = None
            try:
                deliver(self.client, self.tracking_uri, batch)
            except Exception as exc:  # noqa: BLE001 - classified below; nothing is lost
                error = exc
            with self.changed:
                self.busy = False
                if error is None:
                    self._recovered()
                    self.outbox.done(len(batch))
                    self.singles = max(0, self.singles - 1)
                    wait = RETRY_S[0]
                elif not self._keep_trying(error, batch):
                    self.outbox.done(len(batch))
                self.changed.notify_all()

    def _keep_trying(self, error: Exception, batch: list[Record]) -> bool:
        """After a failed delivery: True to keep ``batch`` for later (the server did not answer; an
        OSError, raised in the owner; a batch refused as a whole, sent again one record at a time),
        False when the store refused this one record (reported, dropped)."""
        if unreachable(error, self.tracking_uri):
            if self.since is None:
                self.since = time.time()
                log.warning(
                    f"tracking server {redact(self.tracking_uri)} does not answer ({first_line(error)}); "
                    f"keeping what run {self.run_id} logs and delivering it when the server answers again"
                )
            return True
        if isinstance(error, OSError):
            self.fatal = error
            return True
        if len(batch) > 1:
            self.singles = len(batch)
            return True
        self.singles = max(0, self.singles - 1)
        self._refused(batch, error)
        return False

    def _refused(self, batch: list[Record], error: Exception) -> None:
        what = f"{describe(batch)} of run {self.run_id}: {first_line(error)}"
        log.warning(f"the tracking store refused {what}; not retried")
        self.refused.append(what)

    def _recovered(self) -> None:
        if self.since is not None:
            log.info(f"tracking server {redact(self.tracking_uri)} answers again; delivering what was kept")
            self.since = None

    def drain(self, timeout: float = CLOSE_TIMEOUT_S, longest: float = LONGEST_CLOSE_S) -> bool:
        """Wait until every record is delivered (True), or until the server, silent when asked now, has
        been silent for ``timeout`` seconds (False): an outage that began long ago costs one look, not
        ``timeout`` more seconds. Never longer than ``longest`` seconds."""
        started, told = time.monotonic(), False
        with self.changed:
            self.hurry = True  # a sender waiting out a retry looks again now
            self.changed.notify_all()
        while True:
            with self.changed:
                if not self.outbox.pending() or self.fatal is not None or self.failure is not None:
                    return not self.outbox.pending()
                since, busy = self.since, self.busy
            if time.monotonic() - started > longest:
                return False
            if (since is not None or busy) and not answers(self.tracking_uri):  # silent now
                with self.changed:
                    self.since = since = self.since or time.time()  # a delivery hanging on a server gone
                left = timeout - (time.time() - since)
                if left <= 0:
                    return False
                if not told:
                    told = True
                    log.info(
                        f"waiting up to {left:.0f} s for tracking server {redact(self.tracking_uri)} "
                        f"to deliver {describe(self.outbox.records())} to run {self.run_id}"
                    )
            with self.changed:
                self.changed.wait(0.5)

    def _stop(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        self.thread.join(timeout=1.0)  # a delivery under way when the server went is abandoned, not awaited

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> DeliveryReport:
        """Deliver what is left (see :meth:`drain`), stop, and keep the rest in the outbox file."""
        self.drain(timeout)
        self._stop()
        pending = self.outbox.records()
        self.outbox.close()
        if self.failure is not None:
            raise self.failure
        if self.fatal is not None:
            raise self.fatal
        since = min((t for t in (self.since, self.carried_since) if t is not None), default=None)
        return DeliveryReport(
            tracking_uri=self.tracking_uri,
            folder=self.outbox.folder,
            run_ids=list(dict.fromkeys(r.run_id for r in pending)) or [self.run_id],
            pending=describe(pending),
            count=len(pending),
            since=since,
            refused=list(self.refused),
        )

    def carry(self, folder: Path, timeout: float = 5.0) -> int:
        """A Ray worker's last word: deliver what it can within ``timeout``, then write what is left
        (and what was refused) into ``folder/tracking-outbox`` (its checkpoint) for the driver to
        :meth:`merge`. Returns how many records it carried. Never waits longer than ``timeout``: the
        driver goes on delivering what is left."""
        self.drain(timeout, longest=timeout)
        self._stop()
        if self.failure is not None:
            raise self.failure
        if self.fatal is not None:
            raise self.fatal
        meta = {"since": self.since, "refused": self.refused} if self.since or self.refused else {}
        carried = self.outbox.export(Path(folder) / OUTBOX_DIR, meta) if self.outbox.pending() or meta else 0
        self.outbox.discard()
        return carried

    def merge(self, folder: Path) -> int:
        """Take over the records a worker carried into checkpoint ``folder`` (after everything logged so far)."""
        source = Path(folder) / OUTBOX_DIR
        if not source.is_dir():
            return 0
        records = Outbox(source, tracking_uri=self.tracking_uri).check()
        meta = read_meta(source)
        since = meta.get("since")
        self.refused.extend(meta.get("refused") or [])
        with self.changed:
            if since is not None:  # the worker saw the server go: look before sending (no MLflow retry wait)
                self.carried_since = min(since, self.carried_since or since)
                self.since = self.since or since
            for record in records:
                self.outbox.append(record)
            if any(r.file is not None for r in records):
                self.outbox.spill()  # the checkpoint folder may be a temporary copy: keep the files now
            self.changed.notify_all()
        if records:
            log.info(f"{len(records)} tracking records the training worker could not deliver: {describe(records)}")
        return len(records)


@contextlib.contextmanager
def buffered_run(
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    run_folder: Path,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    close_timeout: float = CLOSE_TIMEOUT_S,
) -> Iterator[BufferedLogger]:
    """``runs.run_context`` with a :class:`BufferedLogger`: the run opens at once (the server answers at the
    start), everything after, its end included, goes through the logger and its outbox
    ``run_folder/tracking-outbox``. Undelivered records raise TrackingNotDelivered after a body that
    succeeded, and are only reported (a warning) when the body raised."""
    from detkd.tracking.runs import start_run

    run_id = start_run(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        tags=tags,
        parent_run_id=parent_run_id,
        resume_run_id=resume_run_id,
    )
    logger = BufferedLogger(tracking_uri=tracking_uri, run_id=run_id, folder=Path(run_folder) / OUTBOX_DIR)
    try:
        yield logger
    except BaseException as exc:
        logger.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        report = logger.close(close_timeout)
        if not report.ok:
            log.warning(report.message(run_folder))
        raise
    logger.end("FINISHED")
    report = logger.close(close_timeout)
    if not report.ok:
        raise TrackingNotDelivered(report.message(run_folder))
