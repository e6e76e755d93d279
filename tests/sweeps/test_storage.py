"""Where a sweep stores its Tune experiment and its trials' checkpoints (no Ray started)."""

from __future__ import annotations

import pytest

from detkd.config import Config
from detkd.sweeps.storage import STORAGE_ENV, join, storage_keys, sweep_storage


def test_a_local_storage_path_keeps_everything_in_the_sweep_folder(tmp_path):
    storage = sweep_storage(Config.model_validate({"run": {"storage_path": "runs/ray"}}), name="s", workdir=tmp_path)
    assert not storage.remote and storage.filesystem is None
    assert storage.tune == f"{tmp_path}/tune" and storage.train == f"{tmp_path}/train"
    assert storage.read("sweep.json") is None
    storage.write("sweep.json", b"{}")
    assert (tmp_path / "sweep.json").read_bytes() == b"{}" == storage.read("sweep.json")
    assert storage_keys(storage) == {}


def test_an_s3_storage_path_holds_the_experiment_and_the_trials_under_sweeps_name(tmp_path, monkeypatch):
    for key in STORAGE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    cfg = Config.model_validate({"run": {"storage_path": "s3://bucket/team/", "storage_endpoint": "http://s3:9000"}})
    storage = sweep_storage(cfg, name="lr", workdir=tmp_path)
    assert storage.remote and storage.root == "s3://bucket/team/sweeps/lr"
    assert storage.path == "bucket/team/sweeps/lr" and storage.tune == "bucket/team/sweeps/lr/tune"
    assert storage.filesystem is not None  # the endpoint's, as a training run's (engine.launch.storage_target)
    assert storage.train == "s3://bucket/team/sweeps/lr/train"  # each trial's run.storage_path
    assert storage_keys(storage) == {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}
    assert "secret" not in repr(storage)


@pytest.mark.parametrize(
    ("location", "joined"),
    [
        ("/w/sweep", "/w/sweep/train"),
        ("s3://b/x/", "s3://b/x/train"),
        ("s3://b/x?region=eu", "s3://b/x/train?region=eu"),
    ],
)
def test_join_keeps_a_uri_query_at_the_end(location, joined):
    assert join(location, "train") == joined


def test_messages_show_the_storage_without_its_secrets(tmp_path):
    cfg = Config.model_validate({"run": {"storage_path": "s3://b/x?secret_key=hunter2"}})
    storage = sweep_storage(cfg, name="s", workdir=tmp_path)
    assert storage.train == "s3://b/x/sweeps/s/train?secret_key=hunter2"  # what Ray needs
    assert "hunter2" not in storage.shown and storage.shown.startswith("s3://b/x/sweeps/s")
