"""MLflow model registry: register a pipeline's chosen student behind a promotion gate.

A registration creates a new version of the registered model from the student's logged
pyfunc and records the gate's inputs, numbers and verdict as version tags, with the student's
deployed speed against its reference and its cost (``detkd.speed.*``, ``detkd.cost.*``): a
registered student is known to meet its speed budget on the machine that registered it. The alias
``champion`` moves to it only when the gate passes *and* it beats the current champion on
the same scoring split (the champion is re-scored on this split when it was measured on
another); otherwise the version gets ``challenger``. Aliases only, never stages.

Registering is idempotent: a model already registered from the same run with the same
checkpoint (SHA-256) is not registered again; the existing version is returned as it is
(aliases unchanged). Registrations of one model are serialised by a lock that is itself a
registered model (``<name>.registering``: creating a registered model is atomic in every
MLflow store), and everything that decides (the duplicate check, the champion and its AP,
the alias move) happens while it is held, so two pipelines registering at once compare
against each other's result and the alias never ends on the worse model. A failure after
the version was created deletes it again: no half-registered version, and the alias is only
ever moved as the last step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from detkd.models.checkpoint import file_digest
from detkd.models.cost import ModelCost
from detkd.serving.speed import SpeedReport

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
LOCK_SUFFIX = ".registering"
STALE_MARK = ".stale."  # a lock taken over is renamed <lock>.stale.<its id>
LOCK_HEARTBEAT_S = 10.0  # the holder refreshes its lock this often
LOCK_STALE_S = 120.0  # a lock not refreshed for this long was left by a crashed registration
TOMBSTONE_KEEP_S = 3600.0  # a taken-over lock is kept this long, then a registration deletes it
TAG = "detkd."


class RegistryBusy(RuntimeError):
    """Another registration of the same model held the lock for longer than the wait allowed."""


@dataclass
class Gate:
    """Promotion floors: AP >= baseline AP + min_gain, AP >= min_ap; deployed speedup over the reference
    >= min_speedup and deployed latency per image <= max_latency_ms (each when set)."""

    min_gain: float = 0.0
    min_ap: float = 0.0
    min_speedup: float | None = None
    max_latency_ms: float | None = None

    @property
    def speed_floor(self) -> bool:
        return self.min_speedup is not None or self.max_latency_ms is not None


@dataclass
class Candidate:
    """A scored model: what the gate and the champion comparison read.

    ``speed`` is its deployed speed against the reference (None when it was not measured, and
    ``speed_unavailable`` says why); ``cost`` its FLOPs and parameters."""

    name: str
    run_id: str
    checkpoint: Path
    ap: float
    split: str  # the split it was scored on (test when the pipeline has one)
    split_digest: str
    speed: SpeedReport | None = None
    speed_unavailable: str = ""
    cost: ModelCost | None = None


@dataclass
class GateVerdict:
    passed: bool
    reasons: list[str]  # one per failed condition; empty when passed
    numbers: dict[str, Any]


@dataclass
class Registration:
    model: str
    version: str
    alias: str
    gate: GateVerdict
    champion_before: str | None
    champion_before_ap: float | None
    verdict: str
    tags: dict[str, str] = field(default_factory=dict)
    existing: bool = False  # the candidate was already this version: nothing was registered


def check_gate(candidate: Candidate, baseline: Candidate | None, gate: Gate) -> GateVerdict:
    """The promotion floors, evaluated on numbers measured on the same split (AP) and the same machine
    against the same reference (speed). A speed floor without a measurement fails: it is never assumed met."""
    reasons = []
    numbers: dict[str, Any] = {
        "ap": round(candidate.ap, 4),
        "min_ap": gate.min_ap,
        "min_gain": gate.min_gain,
        "min_speedup": gate.min_speedup,
        "max_latency_ms": gate.max_latency_ms,
        "split": candidate.split,
    }
    if baseline is not None:
        needed = baseline.ap + gate.min_gain
        numbers.update(baseline=baseline.name, baseline_ap=round(baseline.ap, 4), needed_ap=round(needed, 4))
        if candidate.ap < needed:
            reasons.append(f"AP {candidate.ap:.4f} < baseline {baseline.name} {baseline.ap:.4f} + {gate.min_gain}")
    if candidate.ap < gate.min_ap:
        reasons.append(f"AP {candidate.ap:.4f} < floor {gate.min_ap}")
    reasons += speed_reasons(candidate, gate)
    return GateVerdict(passed=not reasons, reasons=reasons, numbers=numbers)


def speed_reasons(candidate: Candidate, gate: Gate) -> list[str]:
    """The failed speed conditions of ``gate``, e.g. ``speedup 2.41x < floor 3.0x against teacher
    (onnxruntime, 1 thread)``; one reason when a speed floor is set but the speed was not measured."""
    if not gate.speed_floor:
        return []
    speed = candidate.speed
    if speed is None:
        why = candidate.speed_unavailable or "no measurement was given"
        return [f"deployed speed not measured, so the speed floor cannot pass ({why})"]
    how = f"onnxruntime, {speed.threads} thread{'s' if speed.threads > 1 else ''}"
    reasons = []
    if gate.min_speedup is not None and speed.speedup < gate.min_speedup:
        reasons.append(f"speedup {speed.speedup:.2f}x < floor {gate.min_speedup:g}x against {speed.reference} ({how})")
    if gate.max_latency_ms is not None and speed.latency_ms > gate.max_latency_ms:
        reasons.append(
            f"latency {speed.latency_ms:.2f} ms/image > ceiling {gate.max_latency_ms:g} ms ({how}, on {speed.machine})"
        )
    return reasons


def logged_model_uri(tracking_uri: str, run_id: str, *, checkpoint: Path, example_size: int) -> str:
    """The run's logged detkd pyfunc; logged now (into that run) when the run did not log one."""
    from detkd.tracking.runs import log_detector_model

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    ready = [m for m in found if m.name == "model" and str(m.status).endswith("READY")]
    if ready:
        return ready[0].model_uri
    return log_detector_model(
        tracking_uri=tracking_uri, run_id=run_id, checkpoint=checkpoint, example_size=example_size
    )


class registry_lock:  # noqa: N801 - used as a context manager, like open()
    """Hold ``<name>.registering`` while registering ``name``.

    The holder refreshes the lock's ``lock_since`` every LOCK_HEARTBEAT_S, so a lock not refreshed
    for LOCK_STALE_S was left by a crashed process. Taking it over renames it to
    ``<lock>.stale.<its id>``: only one waiter can, since that name is then taken, so two waiters
    that found the same stale lock never both hold it. Each holder releases only a lock that is
    still its own, and ``check`` says whether it still is before the alias moves."""

    def __init__(self, client: MlflowClient, name: str, *, owner: str, wait_s: float = 600.0) -> None:
        self.client, self.name, self.wait_s = client, f"{name}{LOCK_SUFFIX}", wait_s
        self.owner = f"{owner} (pid {os.getpid()} on {socket.gethostname()})"
        self.lock_id = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> registry_lock:
        deadline = time.monotonic() + self.wait_s
        while True:
            if self._create():
                self._heartbeat = threading.Thread(target=self._beat, name=f"{self.name} heartbeat", daemon=True)
                self._heartbeat.start()
                return self
            tags = self._tags()
            if tags is not None and time.time() - _since(tags) > LOCK_STALE_S:
                self._take_over(tags)
                continue
            if time.monotonic() > deadline:
                holder = (tags or {}).get(f"{TAG}lock_owner", "another registration")
                raise RegistryBusy(f"registered model {self.name}: held by {holder}; try again later")
            time.sleep(0.5)

    def _create(self) -> bool:
        try:
            self.client.create_registered_model(
                self.name,
                tags={
                    f"{TAG}lock_owner": self.owner,
                    f"{TAG}lock_id": self.lock_id,
                    f"{TAG}lock_since": f"{time.time():.3f}",
                },
                description="held by detkd while it registers a version of the model without this suffix",
            )
            return True
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return False

    def _tags(self) -> dict[str, str] | None:
        """The lock's tags now; None when nobody holds it."""
        try:
            return dict(self.client.get_registered_model(self.name).tags)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None

    def _take_over(self, tags: dict[str, str]) -> None:
        """Rename the stale lock whose tags were read to a tombstone named after its id; a waiter that read
        the same lock finds that name taken and leaves the lock (now perhaps a live one) alone."""
        stale_id = _lock_id(tags)
        tombstone = f"{self.name}{STALE_MARK}{stale_id}"
        try:
            self.client.rename_registered_model(self.name, tombstone)
        except MlflowException:
            # the tombstone's name is taken, the lock is gone, or (SQL stores) another rename of the same row
            # won: another waiter took it over first. Only a lock still the stale one is an error of its own.
            now = self._tags()
            if now is not None and _lock_id(now) == stale_id:
                raise
            return
        self.client.set_registered_model_tag(tombstone, f"{TAG}taken_over_at", f"{time.time():.3f}")
        log.warning(
            f"registered model {self.name}: took over a lock of {tags.get(f'{TAG}lock_owner', 'unknown')} "
            f"not refreshed for {time.time() - _since(tags):.0f} s (a registration that crashed)"
        )

    def _forget_old_tombstones(self) -> None:
        """Delete tombstones older than TOMBSTONE_KEEP_S (by then no waiter still acts on what it read)."""
        for model in self.client.search_registered_models(f"name LIKE '{self.name}{STALE_MARK}%'"):
            taken = float(model.tags.get(f"{TAG}taken_over_at", "0") or 0)
            if model.name.startswith(f"{self.name}{STALE_MARK}") and time.time() - taken > TOMBSTONE_KEEP_S:
                try:
                    self.client.delete_registered_model(model.name)
                except MlflowException:
                    pass  # another process deleted it

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                if not self.held():
                    log.warning(f"registered model {self.name}: this registration's lock was taken over")
                    return
                self.client.set_registered_model_tag(self.name, f"{TAG}lock_since", f"{time.time():.3f}")
            except MlflowException as exc:  # the server did not answer this time: the next beat tries again
                log.warning(f"registered model {self.name}: could not refresh the lock ({exc.message[:200]})")

    def held(self) -> bool:
        """Whether the lock is still this registration's."""
        tags = self._tags()
        return tags is not None and tags.get(f"{TAG}lock_id") == self.lock_id

    def check(self) -> None:
        """RegistryBusy unless the lock is still this registration's (call before the alias moves)."""
        if not self.held():
            raise RegistryBusy(f"registered model {self.name}: the lock was taken over during this registration")

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            if self.held():
                self.client.delete_registered_model(self.name)
            self._forget_old_tombstones()
        except MlflowException as exc:  # not fatal: the lock goes stale and the next registration takes it over
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                log.warning(f"registered model {self.name}: could not release the lock ({exc.message[:200]})")


def _lock_id(tags: dict[str, str]) -> str:
    """A lock's identity (older locks have no id: their time stands in)."""
    return tags.get(f"{TAG}lock_id") or tags.get(f"{TAG}lock_since", "unknown")


def _since(tags: dict[str, str]) -> float:
    """When a lock was last refreshed (0 when its tag is missing or garbled: a stale lock)."""
    try:
        return float(tags.get(f"{TAG}lock_since", "0"))
    except ValueError:
        return 0.0


def champion_ap_on(
    client: MlflowClient, name: str, version: Any, candidate: Candidate, score: Callable[[Path], float]
) -> float:
    """The champion's AP on the candidate's split: its recorded AP when measured there, else ``score``
    of its checkpoint (the caller's evaluation on that split)."""
    tags = version.tags
    if tags.get(f"{TAG}split_digest") == candidate.split_digest and f"{TAG}ap" in tags:
        return float(tags[f"{TAG}ap"])
    with tempfile.TemporaryDirectory() as folder:
        uri = f"models:/{name}/{version.version}"
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=folder, tracking_uri=client.tracking_uri))
        return score(local / "artifacts/model.pt")


def version_tags(candidate: Candidate, verdict: GateVerdict, extra: dict[str, str] | None) -> dict[str, str]:
    """A new version's tags: what was measured and what the gate said."""
    return {
        f"{TAG}candidate": candidate.name,
        f"{TAG}ap": f"{candidate.ap:.6f}",
        f"{TAG}split": candidate.split,
        f"{TAG}split_digest": candidate.split_digest,
        **speed_tags(candidate),
        f"{TAG}gate.passed": str(verdict.passed).lower(),
        f"{TAG}gate.reasons": "; ".join(verdict.reasons) or "all floors met",
        **{f"{TAG}gate.{k}": str(v) for k, v in verdict.numbers.items()},
        **(extra or {}),
    }


def speed_tags(candidate: Candidate) -> dict[str, str]:
    """``detkd.speed.*`` (the numbers, the reference, backend, turns and machine; or why it was not
    measured) and ``detkd.cost.*`` (MFLOPs and parameters) of a candidate."""
    tags: dict[str, str] = {}
    if candidate.speed is not None:
        tags.update({f"{TAG}speed.{k}": str(v) for k, v in candidate.speed.metrics().items()})
        tags.update({f"{TAG}{k}": v for k, v in candidate.speed.tags().items()})
    elif candidate.speed_unavailable:
        tags[f"{TAG}speed.unavailable"] = candidate.speed_unavailable[:1000]
    if candidate.cost is not None:
        cost = candidate.cost
        tags.update({f"{TAG}cost.mflops": f"{cost.mflops:.3f}", f"{TAG}cost.params": str(cost.params)})
    return tags


def choose_alias(verdict: GateVerdict, candidate_ap: float, champion: tuple[Any, float] | None) -> tuple[str, str]:
    """(alias, why): ``champion`` when the gate passed and the candidate beats the current champion
    (``(version, AP on the candidate's split)``, None when there is none), else ``challenger``."""
    if not verdict.passed:
        return CHALLENGER, "gate failed: " + "; ".join(verdict.reasons)
    if champion is None:
        return CHAMPION, "gate passed; first champion"
    version, ap = champion
    if candidate_ap <= ap:
        return CHALLENGER, f"gate passed; AP {candidate_ap:.4f} does not beat champion v{version} ({ap:.4f})"
    return CHAMPION, f"gate passed; beats champion v{version} ({ap:.4f})"


def registered_version(client: MlflowClient, model: str, candidate: Candidate, *, sha256: str, model_uri: str):
    """The version of ``model`` already registered from the candidate's run and checkpoint, or None.

    The identity is the source run *and* the checkpoint's SHA-256 (the ``detkd.checkpoint_sha256`` tag):
    the run alone could name other weights (a run resumed and trained further), the bytes alone
    another run's lineage. A version registered before that tag existed matches by run and source."""
    for version in client.search_model_versions(f"name = '{model}' and run_id = '{candidate.run_id}'"):
        digest = version.tags.get(f"{TAG}checkpoint_sha256")
        if digest == sha256 or (digest is None and version.source == model_uri):
            return client.get_model_version(model, version.version)  # with its aliases
    return None


def current_champion(client: MlflowClient, model: str) -> Any | None:
    """The version the ``champion`` alias points at, None when there is none (an unreachable store raises)."""
    number = client.get_registered_model(model).aliases.get(CHAMPION)
    return None if number is None else client.get_model_version(model, str(number))


def register_candidate(
    *,
    tracking_uri: str,
    model: str,
    candidate: Candidate,
    baseline: Candidate | None,
    gate: Gate,
    model_uri: str,
    score_on_split: Callable[[Path], float],
    owner: str,
    extra_tags: dict[str, str] | None = None,
    lock_wait_s: float = 600.0,
) -> Registration:
    """Create a version of ``model`` from ``model_uri``, tag it with the gate, and move ``champion`` or
    ``challenger`` to it (see the module docstring); when the candidate's run and checkpoint already are a
    version, return that one (``existing``) and change nothing. ``score_on_split`` (checkpoint -> AP on the
    candidate's split) re-scores a champion that was measured on another split."""
    client = MlflowClient(tracking_uri)
    verdict = check_gate(candidate, baseline, gate)
    sha256 = file_digest(candidate.checkpoint)
    with registry_lock(client, model, owner=owner, wait_s=lock_wait_s) as lock:
        try:
            client.create_registered_model(model, description="detkd students; aliases champion / challenger")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = registered_version(client, model, candidate, sha256=sha256, model_uri=model_uri)
        if found is not None:
            return _already_registered(client, model, found, candidate, verdict)
        tags = {**version_tags(candidate, verdict, extra_tags), f"{TAG}checkpoint_sha256": sha256}
        logged_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        version = client.create_model_version(
            model, source=model_uri, run_id=candidate.run_id, tags=tags, model_id=logged_id
        )
        try:
            current = current_champion(client, model)
            current_ap = champion_ap_on(client, model, current, candidate, score_on_split) if current else None
            champion = (current.version, current_ap) if current is not None else None
            alias, why = choose_alias(verdict, candidate.ap, champion)
            decision = {
                f"{TAG}verdict": why,
                f"{TAG}champion_before": str(current.version) if current else "none",
                f"{TAG}champion_before_ap": f"{current_ap:.6f}" if current_ap is not None else "none",
            }
            for key, value in decision.items():
                client.set_model_version_tag(model, version.version, key, value)
            lock.check()  # nobody else decided meanwhile (the lock was not taken over)
            client.set_registered_model_alias(model, alias, version.version)  # last: the alias moves or nothing does
        except BaseException:
            client.delete_model_version(model, version.version)  # no half-registered version
            raise
    return Registration(
        model=model,
        version=str(version.version),
        alias=alias,
        gate=verdict,
        champion_before=str(current.version) if current else None,
        champion_before_ap=current_ap,
        verdict=why,
        tags={**tags, **decision},
    )


def _already_registered(client: MlflowClient, model: str, found: Any, candidate: Candidate, verdict: GateVerdict):
    """The Registration of a version that already holds the candidate: its aliases as they are."""
    aliases = ", ".join(sorted(found.aliases))
    champion = current_champion(client, model)
    why = (
        f"{candidate.name}: run {candidate.run_id} is already version {found.version} of {model} "
        f"({aliases or 'no alias'}); nothing registered"
    )
    return Registration(
        model=model,
        version=str(found.version),
        alias=aliases,
        gate=verdict,
        champion_before=str(champion.version) if champion else None,
        champion_before_ap=float(champion.tags[f"{TAG}ap"]) if champion and f"{TAG}ap" in champion.tags else None,
        verdict=why,
        tags=dict(found.tags),
        existing=True,
    )


def model_version(client: MlflowClient, uri: str) -> Any | None:
    """The version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names (MlflowException when the store
    has none); None for a URI of another form (``models:/<logged model id>``)."""
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    if "/" in rest:
        name, number = rest.split("/", 1)
        return client.get_model_version(name, number)
    return None


def registered_checkpoint(uri: str, *, tracking_uri: str, cache_dir: Path) -> tuple[Path, str]:
    """The detkd checkpoint inside ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, downloaded once
    per version into ``cache_dir``; returns (checkpoint path, the pinned ``models:/NAME/VERSION``).

    An alias is resolved now, so a run records the exact version it used even if the alias moves."""
    from detkd.config import ConfigError

    try:
        version = model_version(MlflowClient(tracking_uri), uri)
    except MlflowException as exc:
        raise ConfigError(f"{uri}: no such registered model version ({exc.message.splitlines()[0]})") from None
    if version is None:
        raise ConfigError(f"{uri}: give models:/NAME@ALIAS or models:/NAME/VERSION")
    pinned = f"models:/{version.name}/{version.version}"
    store = hashlib.sha1(tracking_uri.encode()).hexdigest()[:8]  # the same name and version in two stores differ
    folder = Path(cache_dir) / f"{version.name}-v{version.version}-{store}"
    path = folder / "artifacts" / "model.pt"
    if not path.is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as staging:
            local = Path(mlflow.artifacts.download_artifacts(pinned, dst_path=staging, tracking_uri=tracking_uri))
            if not (local / "artifacts" / "model.pt").is_file():
                raise ConfigError(f"{uri} ({pinned}): not a detkd model (no artifacts/model.pt)")
            if folder.exists():  # another process finished the same download first
                return path, pinned
            local.rename(folder)
    return path, pinned
