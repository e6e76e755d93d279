"""An image that passes validation but cannot be decoded when training reads it: skipped with
``data.skip_invalid`` (the next readable image takes its place), else the run stops naming the file."""

from __future__ import annotations

import logging
import shutil

import pytest

from detkd.data import load_coco
from detkd.data.dataset import DetectionDataset
from detkd.data.records import DatasetError
from detkd.engine.datasets import TrainingImages, Unreadable, readable_batch


@pytest.fixture()
def one_truncated(tiny_dataset, tmp_path):
    """The tiny training split with its first image cut short after the PNG header (its size still reads)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    source = load_coco(root / "annotations/instances_train.json", root / "images/train")  # validation passes
    image = root / "images/train" / source.records[0].file_name
    image.write_bytes(image.read_bytes()[:120])
    return DetectionDataset(source), image


def test_skip_invalid_puts_the_next_readable_image_in_its_place_warning_once(one_truncated, caplog):
    dataset, image = one_truncated
    images = TrainingImages(dataset, skip_invalid=True)
    with caplog.at_level(logging.WARNING, logger="detkd.train"):
        first, _ = images[0]
        again, _ = images[0]
    assert first.shape == dataset[1][0].shape and (first == dataset[1][0]).all()
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"skipping an unreadable training image (data.skip_invalid): {image}: image id=" in line
    assert "cannot decode image" in line


def test_without_skip_invalid_the_batch_raises_naming_the_file(one_truncated):
    dataset, image = one_truncated
    sample = TrainingImages(dataset, skip_invalid=False)[0]
    assert isinstance(sample[0], Unreadable)  # crosses a loader subprocess as data, not as a re-typed error
    good = TrainingImages(dataset, skip_invalid=False)[1]
    with pytest.raises(DatasetError) as caught:
        readable_batch([good[0], sample[0]], [good[1], sample[1]])
    (problem,) = caught.value.problems
    assert problem.file == str(image) and problem.record.startswith("image id=")
    assert "cannot decode image" in problem.message and "--skip-invalid" in problem.message
    assert readable_batch([good[0]], [good[1]]) == ([good[0]], [good[1]])
