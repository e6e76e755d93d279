"""The newest good checkpoint of a run folder, with real files: a checkpoint whose copy was cut short (a full
disk, a killed worker) is skipped, saying why; "does not fit the model" only for a readable one that does not."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import ray
import torch
from factories import tracking_in

from detkd.config import Config, ConfigError
from detkd.engine.build import build_trainable
from detkd.engine.checkpoints import (
    MODEL_FILE,
    SNAPSHOT,
    TRAIN_STATE,
    GoodCheckpoint,
    RunFolder,
    newest_good,
    read_checkpoint,
    remove_strays,
    snapshot_problem,
)
from detkd.engine.launch import check_resumable, kept_note, publish_model, run_folder
from detkd.engine.plan import build_plan
from detkd.models.checkpoint import CheckpointError, save_payload


def _checkpoint(folder: Path, name: str, *, step: int, model: dict | None = None) -> Path:
    """A complete checkpoint folder as Ray Train leaves it: both files with their sidecars."""
    path = folder / name
    save_payload(path / TRAIN_STATE, {"step": step, "model": model or {"w": torch.full((3,), float(step))}})
    save_payload(path / MODEL_FILE, {"format": "test", "state_dict": {}})
    return path


def _cut(file: Path, keep: int) -> None:
    file.write_bytes(file.read_bytes()[:keep])


def _names(n: int) -> list[str]:
    return [f"checkpoint_2026-01-01_00-00-0{i}.000000" for i in range(n)]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: _cut(c / TRAIN_STATE, 0), "train_state.pt: the file is empty (0 bytes)"),
        (lambda c: _cut(c / TRAIN_STATE, 300), "train_state.pt: the file is corrupted: truncated ("),
        (lambda c: (c / TRAIN_STATE).unlink(), "incomplete: train_state.pt is missing"),
        (lambda c: (c / MODEL_FILE).unlink(), "incomplete: model.pt is missing"),
        (lambda c: _cut(c / MODEL_FILE, 150), "model.pt: the file is corrupted: truncated ("),
    ],
)
def test_the_newest_good_checkpoint_skips_newer_incomplete_ones_saying_why(tmp_path, caplog, damage, reason):
    names = _names(3)
    for step, name in enumerate(names, start=1):
        _checkpoint(tmp_path, name, step=2 * step)
    damage(tmp_path / names[2])
    folder = RunFolder.at(str(tmp_path), display="runs/ray/tiny-1234")
    with caplog.at_level(logging.WARNING, logger="detkd.engine.checkpoints"):
        good = newest_good(folder)
    assert good is not None and (good.name, good.step) == (names[1], 4)
    assert torch.equal(good.state["model"]["w"], torch.full((3,), 4.0))
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"skipping runs/ray/tiny-1234/{names[2]}: {reason}"), line


def test_a_truncated_file_says_how_much_is_missing(tmp_path):
    path = _checkpoint(tmp_path, _names(1)[0], step=2)
    size = (path / TRAIN_STATE).stat().st_size
    header = (path / TRAIN_STATE).read_bytes().index(b"\n") + 1
    _cut(path / TRAIN_STATE, header + 100)
    expected = rf"^train_state.pt: .*truncated \(100 of {size - header} payload bytes\)"
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(RunFolder.at(str(tmp_path)), path.name)


def test_a_sidecar_cut_short_beside_a_whole_file_is_not_a_reason_to_skip(tmp_path):
    path = _checkpoint(tmp_path, _names(1)[0], step=6)
    _cut(path / f"{TRAIN_STATE}.sha256", 10)  # the copy stopped inside the last, smallest file
    assert read_checkpoint(RunFolder.at(str(tmp_path)), path.name)["step"] == 6
    (path / f"{TRAIN_STATE}.sha256").write_text("0" * 64 + "  train_state.pt\n")  # whole, but wrong: corrupt
    with pytest.raises(CheckpointError, match="checksum mismatch with train_state.pt.sha256"):
        read_checkpoint(RunFolder.at(str(tmp_path)), path.name)


def test_no_good_checkpoint_and_no_folder_are_both_none(tmp_path):
    _cut(_checkpoint(tmp_path, _names(1)[0], step=2) / TRAIN_STATE, 0)
    assert newest_good(RunFolder.at(str(tmp_path)), logger=None) is None
    assert newest_good(RunFolder.at(str(tmp_path / "absent")), logger=None) is None


def _plan(tiny_dataset, tiny_config, tmp_path):
    return build_plan(Config.model_validate(tiny_config(tiny_dataset, tmp_path)), tracking=tracking_in(tmp_path))


def test_check_resumable_refuses_only_a_readable_checkpoint_that_does_not_fit(
    tiny_dataset, tiny_config, tmp_path, caplog
):
    plan = _plan(tiny_dataset, tiny_config, tmp_path)
    folder = Path(plan.config.run.storage_path) / plan.ray_name
    fits = {k: v.clone() for k, v in build_trainable(plan, device="cpu")[0].state_dict().items()}
    old, new = _names(2)
    _checkpoint(folder, old, step=4, model=fits)
    _cut(_checkpoint(folder, new, step=6, model=fits) / TRAIN_STATE, 0)  # the full disk's
    with caplog.at_level(logging.WARNING):
        check_resumable(plan)  # resumes from `old`: no error
    assert any(f"skipping {folder}/{new}: train_state.pt: the file is empty" in r.getMessage() for r in caplog.records)
    assert kept_note(plan) == f"{old} (step 4) is kept"

    # a readable checkpoint of another model is refused, naming it (and the unreadable one is still skipped)
    _checkpoint(folder, old, step=4, model={"backbone.old_layer.weight": torch.zeros(3)})
    with pytest.raises(ConfigError, match=rf"does not fit the model .*\({old}: .*backbone.old_layer.weight"):
        check_resumable(plan)


def _snapshot(folder: Path, names: list[str], *, version: str | None = None) -> None:
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {}} for n in names]
    state = {"ray_version": version or ray.__version__, "checkpoint_results": results}
    (folder / SNAPSHOT).write_text(json.dumps(state))


def test_a_checkpoint_list_ray_cannot_start_from_is_set_aside(tiny_dataset, tiny_config, tmp_path):
    plan = _plan(tiny_dataset, tiny_config, tmp_path)
    folder = Path(plan.config.run.storage_path) / plan.ray_name
    fits = build_trainable(plan, device="cpu")[0].state_dict()
    names = _names(2)
    for step, name in enumerate(names, start=1):
        _checkpoint(folder, name, step=step, model=fits)
    run = RunFolder.at(str(folder))
    _snapshot(folder, names)
    assert snapshot_problem(run, ray.__version__) is None
    _snapshot(folder, names, version="2.9.0")
    assert snapshot_problem(run, ray.__version__) == f"written by Ray 2.9.0, this is Ray {ray.__version__}"
    gone = "checkpoint_2026-01-01_00-00-09.000000"
    _snapshot(folder, [*names, gone])
    assert snapshot_problem(run, ray.__version__) == f"lists {gone}, which no longer exists"
    (folder / SNAPSHOT).write_bytes(b"")  # its write cut short by a full disk
    assert snapshot_problem(run, ray.__version__).startswith("unreadable (JSONDecodeError")
    check_resumable(plan)
    assert not (folder / SNAPSHOT).exists() and (folder / f"{SNAPSHOT}.unusable").is_file()


def test_strays_older_than_the_checkpoint_resumed_from_are_removed(tmp_path):
    a, b, c, d = _names(4)
    for step, name in enumerate((a, b, c, d), start=1):
        _checkpoint(tmp_path, name, step=step)
    _cut(tmp_path / b / TRAIN_STATE, 10)
    run = RunFolder.at(str(tmp_path))
    good = GoodCheckpoint(c, {"step": 3})
    assert remove_strays(run, good) == []  # no readable list of Ray's: nothing is deleted
    _snapshot(tmp_path, [a, d])
    assert remove_strays(run, good) == [b]  # c is the one resumed from, d is newer, a is Ray's to prune
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [a, c, d]


def test_run_folder_is_where_ray_train_writes(tiny_dataset, tiny_config, tmp_path):
    plan = _plan(tiny_dataset, tiny_config, tmp_path)
    folder = run_folder(plan)
    assert folder.path == str(Path(plan.config.run.storage_path) / plan.ray_name)
    assert folder.display == f"{plan.config.run.storage_path}/{plan.ray_name}"


def test_a_published_model_is_verified_before_it_replaces_the_last_one(tmp_path):
    source, out = _checkpoint(tmp_path, _names(1)[0], step=1), tmp_path / "models"
    published = publish_model(source, out)
    before = published.read_bytes()
    _cut(source / MODEL_FILE, 200)
    with pytest.raises(CheckpointError, match="truncated"):
        publish_model(source, out)
    assert published.read_bytes() == before  # the published file is untouched


@pytest.mark.server
def test_the_walk_reads_an_s3_run_folder_through_its_filesystem(tmp_path):
    """The same walk on an S3-compatible store (moto): a checkpoint copied up in part is skipped."""
    import pyarrow.fs
    from servers import S3_KEYS, s3_server

    local = tmp_path / "local"
    names = _names(2)
    for step, name in enumerate(names, start=1):
        _checkpoint(local, name, step=step)
    _cut(local / names[1] / TRAIN_STATE, 500)
    with s3_server(tmp_path, buckets=("ckpt",)) as server:
        filesystem = pyarrow.fs.S3FileSystem(
            endpoint_override=server.endpoint,
            access_key=S3_KEYS["AWS_ACCESS_KEY_ID"],
            secret_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            region="us-east-1",
        )
        pyarrow.fs.copy_files(str(local), "ckpt/runs/tiny-1", destination_filesystem=filesystem)
        folder = RunFolder.at("ckpt/runs/tiny-1", filesystem=filesystem, display="s3://ckpt/runs/tiny-1")
        assert folder.checkpoints() == names[::-1]
        messages: list[str] = []
        logger = logging.getLogger("test.walk")
        logger.addHandler(handler := logging.Handler())
        handler.emit = lambda record: messages.append(record.getMessage())
        try:
            good = newest_good(folder, logger=logger)
        finally:
            logger.removeHandler(handler)
    assert good is not None and (good.name, good.step) == (names[0], 1)
    (line,) = messages
    assert line.startswith(f"skipping s3://ckpt/runs/tiny-1/{names[1]}: train_state.pt: the file is corrupted: trunc")


def test_a_copy_cut_at_any_byte_leaves_the_previous_checkpoint_and_is_recognised(tmp_path):
    """Ray copies a checkpoint file by file; wherever the copy stops (every 7th byte of the whole stream and
    every file boundary), the folder counts as a checkpoint only once both payload files are whole, and the
    previous checkpoint is untouched."""
    source = _checkpoint(tmp_path / "source", "checkpoint_x", step=9)
    files = sorted(p.name for p in source.iterdir())  # the order of a sorted copy; any order holds the same
    data = {name: (source / name).read_bytes() for name in files}
    ends, total = {}, 0
    for name in files:
        total += len(data[name])
        ends[name] = total
    whole_at = max(ends[TRAIN_STATE], ends[MODEL_FILE])  # both payloads written: a usable checkpoint
    old, new = _names(2)
    runs = tmp_path / "run"
    _checkpoint(runs, old, step=4)
    before = {p.name: p.read_bytes() for p in (runs / old).iterdir()}
    cuts = sorted({*range(0, total + 1, 7), *(e + d for e in ends.values() for d in (-1, 0, 1) if 0 <= e + d <= total)})
    folder = RunFolder.at(str(runs))
    for cut in cuts:
        target = runs / new
        for stale in target.glob("*") if target.exists() else []:
            stale.unlink()
        target.mkdir(exist_ok=True)
        start = 0
        for name in files:
            if cut > start:
                (target / name).write_bytes(data[name][: cut - start])
            start += len(data[name])
        good = newest_good(folder, logger=None)
        expected = (new, 9) if cut >= whole_at else (old, 4)
        assert (good.name, good.step) == expected, cut
    assert {p.name: p.read_bytes() for p in (runs / old).iterdir()} == before
