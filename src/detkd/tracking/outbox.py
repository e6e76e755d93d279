"""Tracking records not yet delivered to MLflow, oldest first: a file under the run folder, then memory.

When the tracking server does not answer, a run keeps what it would have logged here instead of
waiting: in memory up to a bound, then appended to ``<run folder>/tracking-outbox/records.jsonl``
(artifact files copied into ``artifacts/`` beside it, so the folder replays on its own). Every
record in the file is older than every record in memory, so delivering the file first, then
memory, keeps the order the run logged in. ``delivered.json`` counts the file's delivered lines
(written atomically after each delivery), so a replay that stops halfway continues where it
stopped instead of logging the same points twice. No MLflow here: :mod:`detkd.tracking.delivery`
sends the records.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detkd.config import ConfigError

OUTBOX_DIR = "tracking-outbox"
RECORDS = "records.jsonl"
PROGRESS = "delivered.json"
META = "meta.json"
ARTIFACTS = "artifacts"
KINDS = ("metrics", "params", "tags", "artifact", "dict", "text", "dataset", "model", "end")
FILE_KINDS = ("artifact", "model")  # records that upload a file


class OutboxError(ConfigError):
    """An outbox folder that cannot be read (missing, or a line that is not a record): names file and line."""


@dataclass
class Record:
    """One logging call: ``kind`` (see KINDS), the run it belongs to, its JSON-able payload, and for
    ``artifact``/``model`` the file it uploads."""

    kind: str
    run_id: str
    data: dict[str, Any] = field(default_factory=dict)
    file: Path | None = None

    def to_line(self, file_name: str | None = None) -> str:
        body = {"kind": self.kind, "run_id": self.run_id, "data": self.data}
        if file_name is not None:
            body["file"] = file_name
        return json.dumps(body, allow_nan=True) + "\n"

    @classmethod
    def from_line(cls, line: str, folder: Path) -> Record:
        body = json.loads(line)
        if not isinstance(body, dict) or body.get("kind") not in KINDS or not isinstance(body.get("run_id"), str):
            raise ValueError(f"not a tracking record (kind one of {', '.join(KINDS)}, a run_id, data)")
        if not isinstance(body.get("data"), dict):
            raise ValueError("its data is not an object")
        file = None
        if body["kind"] in FILE_KINDS:
            if not isinstance(body.get("file"), str):
                raise ValueError(f"a {body['kind']} record without its file")
            file = folder / body["file"]
        return cls(body["kind"], body["run_id"], body["data"], file)


def describe(records: Iterable[Record]) -> str:
    """What ``records`` hold, as a reader counts it: "57 metric values, 2 artifacts and the run's end (FINISHED)"."""
    counts: Counter[str] = Counter()
    ends: list[str] = []
    for record in records:
        if record.kind == "metrics":
            counts["metric value"] += len(record.data["metrics"])
        elif record.kind in ("params", "tags"):
            counts[record.kind[:-1]] += len(record.data[record.kind])
        elif record.kind in ("artifact", "dict", "text"):
            counts["artifact"] += 1
        elif record.kind == "dataset":
            counts["dataset input"] += 1
        elif record.kind == "model":
            counts["logged model"] += 1
        elif record.kind == "end":
            ends.append(record.data["status"])
    parts = [f"{n} {what}{'s' if n != 1 else ''}" for what, n in counts.items() if n]
    if ends:
        parts.append(f"the run's end ({ends[-1]})")
    if not parts:
        return "nothing"
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync, rename over it: ``path`` is old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_meta(folder: Path) -> dict[str, Any]:
    """An outbox folder's ``meta.json`` (tracking_uri; a carried one also since and refused); {} without one."""
    path = Path(folder) / META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OutboxError(f"{path}: not JSON ({exc})") from None
    return meta if isinstance(meta, dict) else {}


def outbox_folder(path: Path) -> Path:
    """The outbox of a run folder (``RUN_FOLDER/tracking-outbox``), or ``path`` itself when it is one."""
    path = Path(path)
    return path if (path / RECORDS).is_file() or path.name == OUTBOX_DIR else path / OUTBOX_DIR


class Outbox:
    """Undelivered records of one tracking store, oldest first; thread-safe (an owner appends, a sender
    takes the head and marks it done).

    ``memory_limit`` records stay in memory; one more moves them all to the file. The folder is made
    at the first spill and removed when its last record is delivered.
    """

    def __init__(self, folder: Path, *, tracking_uri: str, memory_limit: int = 1000) -> None:
        self.folder = Path(folder)
        self.tracking_uri = tracking_uri
        self.memory_limit = max(1, memory_limit)
        self.memory: deque[Record] = deque()
        self.lock = threading.RLock()
        self.closed = False
        self.delivered_lines = 0  # of the file, from its start
        self.offset = 0  # byte offset of the first undelivered line
        self.line_sizes: deque[int] = deque()  # bytes of each undelivered line of the file
        if (self.folder / RECORDS).is_file():
            self._open_file()

    # -- the file --------------------------------------------------------------------------------------

    @property
    def records_file(self) -> Path:
        return self.folder / RECORDS

    def meta(self) -> dict[str, Any]:
        return read_meta(self.folder)

    def _open_file(self) -> None:
        """Pick up a file an earlier process left: where its delivery stopped, and each line after that."""
        progress = self.folder / PROGRESS
        if progress.is_file():
            try:
                state = json.loads(progress.read_text())
                self.delivered_lines, self.offset = int(state["lines"]), int(state["offset"])
            except (ValueError, KeyError, TypeError) as exc:
                raise OutboxError(f"{progress}: not a delivery count ({exc})") from None
        with open(self.records_file, "rb") as fh:
            fh.seek(self.offset)
            for number, line in enumerate(fh, start=self.delivered_lines + 1):
                if not line.endswith(b"\n"):  # a spill cut short (the process died mid-write): not a record yet
                    raise OutboxError(
                        f"{self.records_file}:{number}: an unfinished line (its write was cut short, e.g. by a "
                        "full disk); delete that line to deliver the ones before it"
                    )
                self.line_sizes.append(len(line))

    def check(self) -> list[Record]:
        """Every undelivered record of the file, parsed and checked (an OutboxError names the first bad line)."""
        records = []
        for number, line in self._file_lines(len(self.line_sizes)):
            try:
                record = Record.from_line(line, self.folder)
            except (ValueError, UnicodeDecodeError) as exc:
                raise OutboxError(f"{self.records_file}:{number}: {exc}") from None
            if record.file is not None and not record.file.is_file():
                raise OutboxError(f"{self.records_file}:{number}: its file {record.file} is missing")
            records.append(record)
        return records

    def _file_lines(self, limit: int) -> Iterator[tuple[int, str]]:
        if not self.line_sizes or limit <= 0:
            return
        with open(self.records_file, "rb") as fh:
            fh.seek(self.offset)
            for i in range(min(limit, len(self.line_sizes))):
                yield self.delivered_lines + i + 1, fh.readline().decode()

    def _write_meta(self) -> None:
        from detkd.tracking.redact import has_credentials, redact

        uri = self.tracking_uri  # a password stays out of the run folder: a replay then asks for the URI
        write_atomically(
            self.folder / META,
            json.dumps({"tracking_uri": redact(uri), "uri_redacted": has_credentials(uri)}) + "\n",
        )

    def _append_lines(self, records: list[Record]) -> None:
        """Append ``records`` to the file (their files copied in); the caller holds the lock."""
        if not records:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / META).is_file():
            self._write_meta()
        lines = []
        for record in records:
            name = None
            if record.file is not None:
                name = f"{ARTIFACTS}/{uuid.uuid4().hex[:12]}/{record.file.name}"
                (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(record.file, self.folder / name)
                record.file = self.folder / name
            lines.append(record.to_line(name).encode())
        with open(self.records_file, "ab") as fh:
            fh.write(b"".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        self.line_sizes.extend(len(line) for line in lines)

    def _clear_file(self) -> None:
        """Every line of the file is delivered: remove it, its count, its files, and the folder if now empty."""
        for name in (RECORDS, PROGRESS, META):
            (self.folder / name).unlink(missing_ok=True)
        shutil.rmtree(self.folder / ARTIFACTS, ignore_errors=True)
        self.delivered_lines = self.offset = 0
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    # -- what owners and senders call ------------------------------------------------------------------

    def append(self, record: Record) -> None:
        """Keep ``record`` after every other; past the memory bound all of memory moves to the file
        (an OSError there, e.g. a full disk, reaches the caller)."""
        with self.lock:
            if self.closed:
                self._append_lines([record])
                return
            self.memory.append(record)
            if len(self.memory) > self.memory_limit:
                self.spill()

    def spill(self) -> None:
        """Move every record in memory to the end of the file."""
        with self.lock:
            self._append_lines(list(self.memory))
            self.memory.clear()

    def pending(self) -> int:
        with self.lock:
            return len(self.line_sizes) + len(self.memory)

    def head(self, limit: int) -> list[Record]:
        """The ``limit`` oldest undelivered records (file first), left in place until :meth:`done`."""
        with self.lock:
            out = [Record.from_line(line, self.folder) for _, line in self._file_lines(limit)]
            out.extend(list(self.memory)[: max(0, limit - len(out))])
            return out

    def done(self, n: int) -> None:
        """The ``n`` oldest records were delivered (or refused for good): drop them, counting file lines."""
        with self.lock:
            if self.closed:
                return  # closed while a delivery was under way: what it took stays kept (a resend is harmless)
            from_file = min(n, len(self.line_sizes))
            if from_file:
                self.offset += sum(self.line_sizes.popleft() for _ in range(from_file))
                self.delivered_lines += from_file
                if self.line_sizes:
                    state = {"lines": self.delivered_lines, "offset": self.offset}
                    write_atomically(self.folder / PROGRESS, json.dumps(state) + "\n")
                else:
                    self._clear_file()
            for _ in range(n - from_file):
                self.memory.popleft()

    def records(self) -> list[Record]:
        """Every undelivered record, oldest first (reads the file)."""
        with self.lock:
            return self.head(self.pending())

    def close(self) -> None:
        """Move what is still in memory to the file; later :meth:`done` calls change nothing."""
        with self.lock:
            self.spill()
            self.closed = True

    def export(self, dest: Path, meta: dict[str, Any]) -> int:
        """Write every undelivered record (and file) into a new outbox folder ``dest`` with ``meta``; the count."""
        with self.lock:
            records = self.records()
            target = Outbox(dest, tracking_uri=self.tracking_uri, memory_limit=self.memory_limit)
            target._append_lines(records)
            if records or meta:
                target.folder.mkdir(parents=True, exist_ok=True)
                write_atomically(target.folder / META, json.dumps({**target.meta(), **meta}) + "\n")
            return len(records)

    def discard(self) -> None:
        """Forget everything (after :meth:`export` handed it on)."""
        with self.lock:
            self.memory.clear()
            self.line_sizes.clear()
            if self.folder.is_dir():
                shutil.rmtree(self.folder)
            self.closed = True
