"""Registrations racing for one model name: separate processes against one real ``mlflow server``.

Three processes register at the same moment, round after round (a barrier of files): a strong candidate,
a weak one, and the strong one's run again (a rerun of the same pipeline at the same time). Some rounds
start with a stale lock left by a crashed registration, which every waiter finds at once; some start the
weak one first, some the strong one. Every round must end with ``champion`` on the strong candidate,
exactly one version per run, and no lock held."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from factories import registrable_model
from mlflow.tracking import MlflowClient

from detkd.tracking.registry import CHAMPION, LOCK_SUFFIX, STALE_MARK

ROUNDS = [  # (a stale lock waits for them, seconds the strong one starts late, seconds the weak one starts late)
    (False, 0.0, 0.0),
    (False, 0.4, 0.0),  # the weak one is champion for a moment; the strong one must still take it
    (False, 0.0, 0.4),
    (True, 0.0, 0.0),  # every waiter finds the same stale lock: exactly one may take it over
    (True, 0.0, 0.0),
]

WORKER = """
import json, sys, time
from pathlib import Path
from detkd.tracking.registry import Candidate, Gate, register_candidate
args = json.loads(sys.argv[1])
barrier, who = Path(args["barrier"]), args["who"]
for number, delay in enumerate(args["delays"]):
    (barrier / f"{number}-{who}").touch()
    waited = time.monotonic()
    while len(list(barrier.glob(f"{number}-*"))) < args["processes"]:
        if time.monotonic() - waited > 120:
            sys.exit(f"round {number}: another process did not come (it failed)")
        time.sleep(0.01)
    time.sleep(delay)
    result = register_candidate(
        tracking_uri=args["uri"], model=f"raced-{number}", candidate=Candidate(**{**args["candidate"],
        "checkpoint": Path(args["candidate"]["checkpoint"])}), baseline=None, gate=Gate(), model_uri=args["model_uri"],
        score_on_split=lambda path: 1 / 0, owner=who, lock_wait_s=120,
    )
    print(json.dumps({"round": number, "who": who, "version": result.version, "existing": result.existing}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.server
def test_concurrent_registrations_leave_champion_on_the_better_and_one_version_per_run(
    mlflow_server, tiny_dataset, tiny_config, tmp_path
):
    uri = mlflow_server.uri
    client = MlflowClient(uri)
    made = {}
    for seed, name in enumerate(("strong", "weak")):
        path = tmp_path / name / "model.pt"
        made[name] = (*registrable_model(tiny_config(tiny_dataset, tmp_path), path, tracking_uri=uri, seed=seed), path)
    for number, (stale, _, _) in enumerate(ROUNDS):
        if stale:  # a lock its crashed holder stopped refreshing an hour ago
            client.create_registered_model(
                f"raced-{number}{LOCK_SUFFIX}",
                tags={"detkd.lock_id": f"crashed{number}", "detkd.lock_since": f"{time.time() - 3600:.3f}"},
            )
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    aps = {"strong": 0.6, "weak": 0.3}
    workers = {"strong": "strong", "weak": "weak", "strong-rerun": "strong"}
    procs = {}
    for who, which in workers.items():
        run_id, model_uri, path = made[which]
        late = 1 if which == "strong" else 2
        args = {
            "uri": uri,
            "who": who,
            "barrier": str(barrier),
            "processes": len(workers),
            "delays": [r[late] for r in ROUNDS],
            "model_uri": model_uri,
            "candidate": {
                "name": which, "run_id": run_id, "checkpoint": str(path), "ap": aps[which],
                "split": "test", "split_digest": "one-split",
            },
        }  # fmt: skip
        procs[who] = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    ended = {who: proc.communicate(timeout=600) for who, proc in procs.items()}
    failed = [f"{who}:\n{err[-4000:]}" for who, (_, err) in ended.items() if procs[who].returncode != 0]
    if failed:
        pytest.fail("\n".join(failed), pytrace=False)
    results = [json.loads(line) for out, _ in ended.values() for line in out.splitlines() if line.startswith("{")]

    strong_run, weak_run = made["strong"][0], made["weak"][0]
    for number, (stale, _, _) in enumerate(ROUNDS):
        name = f"raced-{number}"
        champion = client.get_model_version_by_alias(name, CHAMPION)
        assert champion.run_id == strong_run, f"round {number}: champion on the weaker candidate"
        versions = client.search_model_versions(f"name = '{name}'")
        assert sorted(v.run_id for v in versions) == sorted([strong_run, weak_run]), f"round {number}"
        mine = {r["who"]: r for r in results if r["round"] == number}
        assert mine["strong"]["version"] == mine["strong-rerun"]["version"] == str(champion.version)
        assert sorted([mine["strong"]["existing"], mine["strong-rerun"]["existing"]]) == [False, True]
        assert not mine["weak"]["existing"]
        assert not client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'"), f"round {number}: lock held"
        tombstones = client.search_registered_models(f"name LIKE '{name}{LOCK_SUFFIX}{STALE_MARK}%'")
        assert [t.name for t in tombstones] == ([f"{name}{LOCK_SUFFIX}{STALE_MARK}crashed{number}"] if stale else [])
