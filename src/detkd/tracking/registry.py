"""MLflow model registry: register a pipeline's chosen student behind a promotion gate.

A registration creates a new version of the registered model from the student's logged
pyfunc and records the gate's inputs, numbers and verdict as version tags. The alias
``champion`` moves to it only when the gate passes *and* it beats the current champion on
the same scoring split (the champion is re-scored on this split when it was measured on
another); otherwise the version gets ``challenger``. Aliases only, never stages.

Registrations of one model are serialised by a lock that is itself a registered model
(``<name>.registering``: creating a registered model is atomic in every MLflow store), so
two pipelines registering at once compare against each other's result, and the alias
never ends on the worse model. A failure after the version was created deletes it again:
no half-registered version, and the alias is only ever moved as the last step.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
LOCK_SUFFIX = ".registering"
LOCK_STALE_S = 900.0  # a lock older than this was left by a crashed registration
TAG = "detkd."


class RegistryBusy(RuntimeError):
    """Another registration of the same model held the lock for longer than the wait allowed."""


@dataclass
class Gate:
    """Promotion floors: AP >= baseline AP + min_gain, AP >= min_ap, images/s >= min_images_per_s."""

    min_gain: float = 0.0
    min_ap: float = 0.0
    min_images_per_s: float | None = None


@dataclass
class Candidate:
    """A scored model: what the gate and the champion comparison read."""

    name: str
    run_id: str
    checkpoint: Path
    ap: float
    images_per_s: float
    split: str  # the split it was scored on (test when the pipeline has one)
    split_digest: str


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


def check_gate(candidate: Candidate, baseline: Candidate | None, gate: Gate) -> GateVerdict:
    """The promotion floors, evaluated on numbers measured on the same split."""
    reasons = []
    numbers: dict[str, Any] = {
        "ap": round(candidate.ap, 4),
        "images_per_s": round(candidate.images_per_s, 1),
        "min_ap": gate.min_ap,
        "min_gain": gate.min_gain,
        "min_images_per_s": gate.min_images_per_s,
        "split": candidate.split,
    }
    if baseline is not None:
        needed = baseline.ap + gate.min_gain
        numbers.update(baseline=baseline.name, baseline_ap=round(baseline.ap, 4), needed_ap=round(needed, 4))
        if candidate.ap < needed:
            reasons.append(f"AP {candidate.ap:.4f} < baseline {baseline.name} {baseline.ap:.4f} + {gate.min_gain}")
    if candidate.ap < gate.min_ap:
        reasons.append(f"AP {candidate.ap:.4f} < floor {gate.min_ap}")
    if gate.min_images_per_s is not None and candidate.images_per_s < gate.min_images_per_s:
        reasons.append(f"{candidate.images_per_s:.1f} images/s < floor {gate.min_images_per_s}")
    return GateVerdict(passed=not reasons, reasons=reasons, numbers=numbers)


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
    """Hold ``<name>.registering`` while registering ``name`` (stale locks are taken over)."""

    def __init__(self, client: MlflowClient, name: str, *, owner: str, wait_s: float = 600.0) -> None:
        self.client, self.name, self.owner, self.wait_s = client, f"{name}{LOCK_SUFFIX}", owner, wait_s

    def __enter__(self) -> registry_lock:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                self.client.create_registered_model(
                    self.name,
                    tags={f"{TAG}lock_owner": self.owner, f"{TAG}lock_since": f"{time.time():.3f}"},
                    description="held by detkd while it registers a version of the model without this suffix",
                )
                return self
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            held = self._held_since()
            if held is not None and time.time() - held > LOCK_STALE_S:
                self._release()  # left by a crashed registration
                continue
            if time.monotonic() > deadline:
                raise RegistryBusy(f"registered model {self.name}: another registration holds it; try again later")
            time.sleep(0.5)

    def _held_since(self) -> float | None:
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException:
            return None  # released meanwhile
        try:
            return float(tags.get(f"{TAG}lock_since", "nan"))
        except ValueError:
            return None

    def _release(self) -> None:
        try:
            self.client.delete_registered_model(self.name)
        except MlflowException:
            pass  # already gone

    def __exit__(self, *exc_info: Any) -> None:
        self._release()


def champion_ap_on(
    client: MlflowClient, name: str, version: Any, candidate: Candidate, score: Callable[[Path], float]
) -> float:
    """The champion's AP on the candidate's split: its recorded AP when measured there, else ``score``
    of its checkpoint (the caller's evaluation on that split)."""
    tags = version.tags
    if tags.get(f"{TAG}split_digest") == candidate.split_digest and f"{TAG}ap" in tags:
        return float(tags[f"{TAG}ap"])
    with tempfile.TemporaryDirectory() as folder:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=folder))
        return score(local / "artifacts/model.pt")


def version_tags(candidate: Candidate, verdict: GateVerdict, extra: dict[str, str] | None) -> dict[str, str]:
    """A new version's tags: what was measured and what the gate said."""
    return {
        f"{TAG}candidate": candidate.name,
        f"{TAG}ap": f"{candidate.ap:.6f}",
        f"{TAG}images_per_s": f"{candidate.images_per_s:.2f}",
        f"{TAG}split": candidate.split,
        f"{TAG}split_digest": candidate.split_digest,
        f"{TAG}gate.passed": str(verdict.passed).lower(),
        f"{TAG}gate.reasons": "; ".join(verdict.reasons) or "all floors met",
        **{f"{TAG}gate.{k}": str(v) for k, v in verdict.numbers.items()},
        **(extra or {}),
    }


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
    ``challenger`` to it (see the module docstring). ``score_on_split`` (checkpoint -> AP on the candidate's
    split) re-scores a champion that was measured on another split."""
    client = MlflowClient(tracking_uri)
    verdict = check_gate(candidate, baseline, gate)
    with registry_lock(client, model, owner=owner, wait_s=lock_wait_s):
        try:
            client.create_registered_model(model, description="detkd students; aliases champion / challenger")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = version_tags(candidate, verdict, extra_tags)
        logged_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        version = client.create_model_version(
            model, source=model_uri, run_id=candidate.run_id, tags=tags, model_id=logged_id
        )
        try:
            try:
                current = client.get_model_version_by_alias(model, CHAMPION)
            except MlflowException:
                current = None
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
