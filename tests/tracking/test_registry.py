"""The gated registry on a real MLflow store: promotion, refusal, re-scoring, rollback, locking, concurrency,
and registering the same run's model again (nothing new)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pandas as pd
import pytest
import torch
from factories import registrable_model
from mlflow.tracking import MlflowClient

from detkd.data.coco import load_coco
from detkd.engine.evaluate import evaluate_checkpoint
from detkd.engine.launch import dataset_records
from detkd.models import build_detector, load_detector, save_detector
from detkd.serving.predictor import Predictor
from detkd.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    LOCK_SUFFIX,
    STALE_MARK,
    Candidate,
    Gate,
    Registration,
    RegistryBusy,
    logged_model_uri,
    register_candidate,
    registry_lock,
)
from detkd.tracking.runs import dataset_digest, experiment_id


@pytest.fixture(scope="module", params=["sqlite", pytest.param("mlflow server", marks=pytest.mark.server)])
def models(request, trained_detector, tiny_dataset, tmp_path_factory):
    """The trained detector and an untrained one of the same plan, both logged and scored on the tiny val
    split, in the embedded SQLite store and in a real ``mlflow server`` on 127.0.0.1."""
    if request.param == "sqlite":
        uri, artifacts = trained_detector.tracking_uri, None
    else:
        server = request.getfixturevalue("mlflow_server")
        uri, artifacts = server.uri, server.artifacts
    source = load_coco(tiny_dataset / "annotations/instances_val.json", tiny_dataset / "images/val")
    digest = dataset_digest(dataset_records(source))
    _, meta = load_detector(trained_detector.model_path)
    torch.manual_seed(0)
    untrained = build_detector(**load_detector(trained_detector.model_path)[0].detkd_config)
    weak_path = tmp_path_factory.mktemp("weak") / "model.pt"
    save_detector(weak_path, untrained, meta={"plan": meta["plan"], "role": "student"})
    client = MlflowClient(uri)

    def finished_run(name: str) -> str:
        run_id = client.create_run(experiment_id(uri, "detkd"), run_name=name).info.run_id
        client.set_terminated(run_id)
        return run_id

    strong_run = trained_detector.run_id if request.param == "sqlite" else finished_run("strong")

    def candidate(name, run_id, path) -> Candidate:
        result = evaluate_checkpoint(path, source)
        return Candidate(name, run_id, path, result.metrics["AP"], "val", digest)

    strong = candidate("strong", strong_run, trained_detector.model_path)
    weak = candidate("weak", finished_run("weak"), weak_path)
    assert strong.ap > weak.ap + 0.05  # the comparison below means something
    uris = {c.name: logged_model_uri(uri, c.run_id, checkpoint=c.checkpoint, example_size=64) for c in (strong, weak)}
    assert client.get_run(weak.run_id).info.status == "FINISHED"  # logging into a finished run keeps it finished
    mlflow.set_tracking_uri(uri)

    def another_run(who: str) -> tuple[Candidate, str]:
        """The same checkpoint logged by another run (so registering it makes a new version): (candidate, URI)."""
        chosen = Candidate(**{**{"strong": strong, "weak": weak}[who].__dict__, "run_id": finished_run(f"{who} again")})
        return chosen, logged_model_uri(uri, chosen.run_id, checkpoint=chosen.checkpoint, example_size=64)

    return {
        "another_run": another_run,
        "uri": uri,
        "artifacts": artifacts,
        "source": source,
        "strong": strong,
        "weak": weak,
        "model_uri": uris,
        "trained_run": trained_detector.run_id,
    }


def register(models, name, who, *, gate=None, baseline=None, candidate=None, model_uri=None, **kwargs):
    chosen = candidate or models[who]
    return register_candidate(
        tracking_uri=models["uri"],
        model=name,
        candidate=chosen,
        baseline=baseline,
        gate=gate or Gate(),
        model_uri=model_uri or models["model_uri"][who],
        score_on_split=lambda path: evaluate_checkpoint(path, models["source"]).metrics["AP"],
        owner=f"test-{who}",
        **kwargs,
    )


@pytest.mark.ray
def test_gate_promotes_the_better_and_refuses_the_worse(models, tiny_dataset):
    client = MlflowClient(models["uri"])
    first = register(models, "gated", "weak")
    assert (first.alias, first.verdict) == (CHAMPION, "gate passed; first champion")

    better = register(models, "gated", "strong")
    assert better.alias == CHAMPION and better.champion_before == first.version
    assert better.champion_before_ap == pytest.approx(models["weak"].ap, abs=1e-6)  # the tag keeps 6 decimals

    same = register(models, "gated", "weak")  # the same run and checkpoint again: nothing new, no alias moves
    assert (same.existing, same.version, same.alias) == (True, first.version, "")

    weak_again, weak_again_uri = models["another_run"]("weak")
    again = register(models, "gated", "weak", candidate=weak_again, model_uri=weak_again_uri)
    assert again.alias == CHALLENGER and "does not beat champion" in again.verdict  # passes the floors

    weak_gated, weak_gated_uri = models["another_run"]("weak")
    gated = register(
        models, "gated", "weak", candidate=weak_gated, model_uri=weak_gated_uri, baseline=models["strong"],
        gate=Gate(min_gain=0.0, min_ap=0.0),
    )  # fmt: skip
    assert gated.alias == CHALLENGER and not gated.gate.passed
    assert "baseline strong" in gated.gate.reasons[0]
    tags = client.get_model_version("gated", gated.version).tags
    assert tags["detkd.gate.passed"] == "false" and tags["detkd.gate.baseline"] == "strong"
    assert float(tags["detkd.gate.baseline_ap"]) == pytest.approx(models["strong"].ap, abs=1e-4)
    assert tags["detkd.champion_before"] == better.version

    strong_again, strong_again_uri = models["another_run"]("strong")
    floor = register(
        models, "gated", "strong", candidate=strong_again, model_uri=strong_again_uri, gate=Gate(min_ap=0.99)
    )
    assert floor.alias == CHALLENGER and "floor 0.99" in floor.verdict

    assert str(client.get_model_version_by_alias("gated", CHAMPION).version) == better.version
    assert str(client.get_model_version_by_alias("gated", CHALLENGER).version) == floor.version
    assert not [v for v in client.search_model_versions("name = 'gated'") if v.current_stage != "None"]  # no stages

    # the champion loads by alias, without pickles, and predicts like the checkpoint it was registered from
    images = [p.read_bytes() for p in sorted((tiny_dataset / "images/val").iterdir())[:3]]
    served = mlflow.pyfunc.load_model("models:/gated@champion").predict(pd.DataFrame({"image": images}))
    local = Predictor.from_checkpoint(models["strong"].checkpoint)(images)
    assert [list(r) for r in served["category_ids"]] == [d.category_ids for d in local]


@pytest.mark.ray
def test_champion_measured_elsewhere_is_rescored_on_this_split(models):
    elsewhere = Candidate(**{**models["strong"].__dict__, "split_digest": "another-split", "ap": 0.0})
    register(models, "rescored", "strong", candidate=elsewhere)
    result = register(models, "rescored", "weak")
    assert result.champion_before_ap == pytest.approx(models["strong"].ap, abs=1e-6)  # re-scored, not the 0.0 tag
    assert result.alias == CHALLENGER


@pytest.mark.ray
def test_failure_mid_registration_leaves_no_version_and_no_alias_move(models):
    client = MlflowClient(models["uri"])
    elsewhere = Candidate(**{**models["weak"].__dict__, "split_digest": "another-split"})
    champion = register(models, "rollback", "weak", candidate=elsewhere)
    # the champion's checkpoint becomes unreadable: re-scoring it fails after the new version was created
    source = client.get_model_version("rollback", champion.version).source
    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    if location.startswith("mlflow-artifacts:"):  # proxied by the server into its artifact root
        root = models["artifacts"] / unquote(urlparse(location).path).lstrip("/")
    else:
        root = Path(unquote(urlparse(location).path))
    original = (root / "artifacts/model.pt").read_bytes()
    (root / "artifacts/model.pt").write_bytes(original[: len(original) // 2])
    try:
        with pytest.raises(Exception, match="truncated|corrupt"):
            register(models, "rollback", "strong")
    finally:
        (root / "artifacts/model.pt").write_bytes(original)
    versions = client.search_model_versions("name = 'rollback'")
    assert [str(v.version) for v in versions] == [champion.version]
    assert str(client.get_model_version_by_alias("rollback", CHAMPION).version) == champion.version
    assert not client.search_registered_models(f"name = 'rollback{LOCK_SUFFIX}'")  # the lock was released


@pytest.mark.ray
def test_a_held_lock_makes_registration_wait_then_refuse(models):
    client = MlflowClient(models["uri"])
    client.create_registered_model(f"locked{LOCK_SUFFIX}", tags={"detkd.lock_since": f"{time.time():.3f}"})
    with pytest.raises(RegistryBusy, match="held by another registration; try again later"):
        register(models, "locked", "strong", lock_wait_s=1.0)
    assert not client.search_model_versions("name = 'locked'")
    # a lock left by a crashed registration (older than the stale limit) is taken over
    client.set_registered_model_tag(f"locked{LOCK_SUFFIX}", "detkd.lock_since", f"{time.time() - 3600:.3f}")
    assert register(models, "locked", "strong", lock_wait_s=1.0).alias == CHAMPION


CONCURRENT = """
import json, sys, time
from pathlib import Path
from detkd.data.coco import load_coco
from detkd.engine.evaluate import evaluate_checkpoint
from detkd.tracking.registry import Candidate, Gate, register_candidate
args = json.loads(sys.argv[1])
source = load_coco(Path(args["data"]) / "annotations/instances_val.json", Path(args["data"]) / "images/val")
candidate = Candidate(**{**args["candidate"], "checkpoint": Path(args["candidate"]["checkpoint"])})
while time.time() < args["start_at"]:
    time.sleep(0.005)
result = register_candidate(tracking_uri=args["uri"], model="raced", candidate=candidate, baseline=None, gate=Gate(),
                            model_uri=args["model_uri"], owner=candidate.name,
                            score_on_split=lambda path: evaluate_checkpoint(path, source).metrics["AP"])
print(json.dumps({"version": result.version, "alias": result.alias}))
"""


@pytest.mark.ray
def test_two_registrations_at_once_leave_the_champion_on_the_better(models, tiny_dataset):
    start_at = time.time() + 15  # both processes import detkd first, then start together
    procs = []
    for who in ("weak", "strong"):
        chosen = models[who]
        args = {
            "uri": models["uri"],
            "data": str(tiny_dataset),
            "start_at": start_at,
            "model_uri": models["model_uri"][who],
            "candidate": {**chosen.__dict__, "checkpoint": str(chosen.checkpoint)},
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CONCURRENT, json.dumps(args)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    client = MlflowClient(models["uri"])
    champion = client.get_model_version_by_alias("raced", CHAMPION)
    assert champion.run_id == models["strong"].run_id
    assert len(client.search_model_versions("name = 'raced'")) == 2
    assert not client.search_registered_models(f"name = 'raced{LOCK_SUFFIX}'")


@pytest.mark.ray
def test_registered_models_go_wherever_checkpoints_go(models, tiny_dataset, tiny_config, tmp_path, monkeypatch):
    """models:/NAME@ALIAS as a teacher (pinned to its version), for detkd evaluate and for detkd export."""
    from typer.testing import CliRunner

    from detkd.cli import app
    from detkd.config import Config, ConfigError
    from detkd.engine.plan import build_plan
    from detkd.records import TrackingContext

    shipped = register(models, "shipped", "strong")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", models["uri"])
    monkeypatch.setenv("DETKD_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    val = ["--coco", str(tiny_dataset / "annotations/instances_val.json"), "--images", str(tiny_dataset / "images/val")]
    summary = tmp_path / "row.json"
    result = runner.invoke(
        app, ["evaluate", "models:/shipped@champion", *val, "--score-thresh", "0.05", "--summary", str(summary)]
    )
    assert result.exit_code == 0, result.output
    row = json.loads(summary.read_text())[0]
    assert row["AP"] == pytest.approx(models["strong"].ap, abs=1e-4) and row["mlflow_run_id"] == models["trained_run"]
    assert f"models:/shipped/{shipped.version}" in result.output  # the alias is pinned to a version

    out = tmp_path / "shipped.onnx"
    result = runner.invoke(app, ["export", f"models:/shipped/{shipped.version}", "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0 and out.is_file(), result.output

    student = tiny_config(
        tiny_dataset,
        tmp_path,
        input={"size": 64, "scale": 0.5},
        model={"min_level": 2, "max_level": 5},
        distill={"teachers": [{"source": "models:/shipped@champion"}], "mse": {}},
    )
    plan = build_plan(Config.model_validate(student), tracking=TrackingContext(uri=models["uri"], experiment="detkd"))
    (teacher,) = plan.teachers
    assert teacher.source == "models:/shipped@champion" and f"shipped-v{shipped.version}-" in teacher.path
    assert teacher.mlflow_run_id == models["trained_run"]  # lineage reaches the teacher's training run
    assert Path(teacher.path).read_bytes() == models["strong"].checkpoint.read_bytes()

    missing = {**student, "distill": {"teachers": [{"source": "models:/shipped@nobody"}], "mse": {}}}
    with pytest.raises(ConfigError, match="models:/shipped@nobody: no such registered model version"):
        build_plan(Config.model_validate(missing), tracking=TrackingContext(uri=models["uri"], experiment="detkd"))


@pytest.fixture(scope="module", params=["sqlite", pytest.param("mlflow server", marks=pytest.mark.server)])
def untrained(request, tiny_dataset, tiny_config, tmp_path_factory):
    """Two untrained detectors, each with a finished run and a logged model, in a SQLite store and in a real
    ``mlflow server``: what registering needs, without training (their APs are given, on one split)."""
    work = tmp_path_factory.mktemp("untrained")
    if request.param == "sqlite":
        uri = f"sqlite:///{work / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("mlflow_server").uri
    made = {}
    for seed, name in enumerate(("a", "b")):
        path = work / name / "model.pt"
        run_id, model_uri = registrable_model(tiny_config(tiny_dataset, work), path, tracking_uri=uri, seed=seed)
        made[name] = (run_id, path, model_uri)
    return {"uri": uri, "made": made, "work": work}


def register_untrained(untrained, model: str, who: str, ap: float, *, checkpoint: Path | None = None) -> Registration:
    run_id, path, model_uri = untrained["made"][who]

    def no_rescoring(_: Path) -> float:
        raise AssertionError("every candidate here was scored on the same split: nothing is re-scored")

    return register_candidate(
        tracking_uri=untrained["uri"],
        model=model,
        candidate=Candidate(who, run_id, checkpoint or path, ap, "val", "one-split"),
        baseline=None,
        gate=Gate(),
        model_uri=model_uri,
        score_on_split=no_rescoring,
        owner=f"test-{who}",
    )


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def test_registering_the_same_run_and_checkpoint_again_returns_its_version(untrained):
    client = MlflowClient(untrained["uri"])
    name = "rerun"
    first = register_untrained(untrained, name, "a", 0.3)
    assert (first.version, first.alias, first.existing) == ("1", CHAMPION, False)
    sha = client.get_model_version(name, "1").tags["detkd.checkpoint_sha256"]
    assert len(sha) == 64

    again = register_untrained(untrained, name, "a", 0.3)  # a pipeline rerun that reused the finished student
    assert (again.version, again.alias, again.existing) == ("1", CHAMPION, True)
    run_a = untrained["made"]["a"][0]
    assert again.verdict == f"a: run {run_a} is already version 1 of rerun (champion); nothing registered"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]

    better = register_untrained(untrained, name, "b", 0.5)
    assert (better.version, better.alias) == ("2", CHAMPION)
    later = register_untrained(untrained, name, "a", 0.3)  # aliases stay where they are: v1 holds none now
    assert (later.version, later.alias, later.existing) == ("1", "", True)
    assert "(no alias); nothing registered" in later.verdict
    assert aliases(client, name) == {CHAMPION: "2"}
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

    # the same run with other weights (a run resumed and trained further) is another model: a new version
    retrained = untrained["work"] / "a-retrained" / "model.pt"
    retrained.parent.mkdir()
    retrained.write_bytes(untrained["made"]["b"][1].read_bytes())
    other = register_untrained(untrained, name, "a", 0.3, checkpoint=retrained)
    assert (other.version, other.alias, other.existing) == ("3", CHALLENGER, False)
    assert aliases(client, name) == {CHAMPION: "2", CHALLENGER: "3"}
    assert not client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")  # the lock was released each time


def test_a_stale_lock_is_taken_over_once_even_by_waiters_that_read_it_together(untrained):
    """The interleaving that let two waiters hold the lock, forced: a waiter reads a stale lock, another takes it
    over and holds it, then the first acts on what it read. It must leave the live lock alone."""
    client = MlflowClient(untrained["uri"])
    stale = {"detkd.lock_id": "crashed", "detkd.lock_since": f"{time.time() - 3600:.3f}"}
    client.create_registered_model(f"stale{LOCK_SUFFIX}", tags=stale)
    late = registry_lock(client, "stale", owner="late waiter")
    read = late._tags()  # the late waiter finds the lock stale...
    with registry_lock(client, "stale", owner="first waiter", wait_s=5) as first:  # ...another takes it over
        late._take_over(read)  # ...and the late waiter acts on what it read
        assert first.held()
        first.check()
        # a registration whose lock was taken over (it stopped refreshing it) must not move an alias
        client.rename_registered_model(f"stale{LOCK_SUFFIX}", "stale.elsewhere")
        with pytest.raises(RegistryBusy, match="taken over during this registration"):
            first.check()
        client.rename_registered_model("stale.elsewhere", f"stale{LOCK_SUFFIX}")
    assert not client.search_registered_models(f"name = 'stale{LOCK_SUFFIX}'")  # released by its holder
    tombstones = [m.name for m in client.search_registered_models(f"name LIKE 'stale{LOCK_SUFFIX}{STALE_MARK}%'")]
    assert tombstones == [f"stale{LOCK_SUFFIX}{STALE_MARK}crashed"]
