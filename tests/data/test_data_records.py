"""records: labels, COCO export, problems and DatasetError formatting."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from pycocotools.coco import COCO

from detkd.data import open_source
from detkd.data.coco import load_coco
from detkd.data.records import Category, DatasetError, DetectionSource, ImageRecord, Problem


def _record(image_id: int, boxes: list[list[float]], cats: list[int], crowd: list[bool] | None = None) -> ImageRecord:
    n = len(boxes)
    return ImageRecord(
        image_id=image_id,
        file_name=f"{image_id}.png",
        width=100,
        height=80,
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        category_ids=np.array(cats, dtype=np.int64),
        iscrowd=np.array(crowd if crowd is not None else [False] * n, dtype=bool),
        annotation_ids=np.arange(image_id * 10, image_id * 10 + n, dtype=np.int64),
    )


def _source(records: list[ImageRecord]) -> DetectionSource:
    return DetectionSource(
        categories=[Category(90, "bird"), Category(3, "cat"), Category(7, "dog")],
        records=records,
        image_reader=lambda r: b"",
        origin="memory",
    )


def test_labels_are_contiguous_in_category_id_order() -> None:
    source = _source([])
    assert [source.label_of(i) for i in (3, 7, 90)] == [1, 2, 3]
    assert source.num_classes == 3
    assert source.category_names == ["cat", "dog", "bird"]
    with pytest.raises(KeyError, match="unknown category id 4"):
        source.label_of(4)
    labels = source.labels_of(np.array([90, 3, 3, 7]))
    assert labels.tolist() == [3, 1, 1, 2] and labels.dtype == np.int64
    assert source.labels_of(np.zeros(0, np.int64)).shape == (0,)
    with pytest.raises(KeyError, match="unknown category id 5"):
        source.labels_of(np.array([3, 5]))


def test_image_record_coerces_dtypes_and_checks_lengths() -> None:
    rec = ImageRecord(1, "a.png", 10, 10, [[0, 0, 1, 1]], [3], [0], [5])
    assert rec.boxes.dtype == np.float32 and rec.boxes.shape == (1, 4)
    assert rec.category_ids.dtype == np.int64
    assert rec.iscrowd.dtype == bool
    empty = ImageRecord(2, "b.png", 10, 10, [], [], [], [])
    assert empty.boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="same length"):
        ImageRecord(3, "c.png", 10, 10, [[0, 0, 1, 1]], [3, 7], [0], [5])
    assert rec == ImageRecord(1, "a.png", 10, 10, [[0, 0, 1, 1]], [3], [0], [5])
    assert rec != ImageRecord(1, "a.png", 10, 10, [[0, 0, 1, 2]], [3], [0], [5])


def test_to_coco_dict_is_a_valid_coco_ground_truth() -> None:
    source = _source(
        [
            _record(1, [[10, 20, 40, 60], [0, 0, 100, 80]], [7, 3], crowd=[False, True]),
            _record(2, [], []),
        ]
    )
    gt = source.to_coco_dict()

    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert sorted(coco.getImgIds()) == [1, 2]
    ann = coco.loadAnns([10])[0]
    assert ann["bbox"] == [10.0, 20.0, 30.0, 40.0]
    assert ann["area"] == 1200.0
    assert ann["category_id"] == 7
    assert ann["iscrowd"] == 0
    assert coco.loadAnns([11])[0]["iscrowd"] == 1
    assert [c["id"] for c in gt["categories"]] == [3, 7, 90]


def test_to_coco_dict_round_trips_a_coco_file(coco_set) -> None:
    source = load_coco(coco_set.ann_path, coco_set.images_dir)
    gt = source.to_coco_dict()
    by_id = {a["id"]: a for a in gt["annotations"]}
    assert by_id[1]["bbox"] == [10.0, 10.0, 20.0, 15.0]
    assert by_id[4]["iscrowd"] == 1
    assert by_id[5]["bbox"] == pytest.approx([45.5, 45.5, 5.4, 5.4], abs=1e-5)
    assert len(gt["images"]) == 5


def test_problem_and_dataset_error_formatting() -> None:
    problem = Problem("a.json", "annotation id=7", "bad bbox")
    assert str(problem) == "a.json: annotation id=7: bad bbox"

    problems = [Problem("a.json", f"annotation id={i}", "bad") for i in range(60)]
    error = DatasetError(problems)
    lines = str(error).splitlines()
    assert len(lines) == 51
    assert lines[0] == "a.json: annotation id=0: bad"
    assert lines[-1] == "... and 10 more problems"
    assert error.problems == problems
    assert isinstance(error, ValueError)
    # survives the trip back from a DataLoader worker
    again = pickle.loads(pickle.dumps(error))
    assert again.problems == problems


def test_open_source_dispatch_and_argument_errors(coco_set, tmp_path) -> None:
    source = open_source(coco=coco_set.ann_path, images=coco_set.images_dir)
    assert len(source.records) == 5
    with pytest.raises(ValueError, match="no dataset given"):
        open_source()
    with pytest.raises(ValueError, match="missing images="):
        open_source(coco=coco_set.ann_path)
    with pytest.raises(ValueError, match="missing coco="):
        open_source(images=coco_set.images_dir)
    with pytest.raises(ValueError, match="not both"):
        open_source(coco=coco_set.ann_path, images=coco_set.images_dir, parquet=tmp_path)
