"""validate_coco / load_coco: every bad-input case gives one located problem; valid data loads."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from detkd.data.coco import load_coco, validate_coco
from detkd.data.records import DatasetError, Problem

ALL_IMAGE_IDS = [1, 2, 3, 4, 5]
ALL_ANN_IDS = [1, 2, 3, 4, 5, 6]


def _image_ids(source) -> list[int]:
    return [r.image_id for r in source.records]


def _ann_ids(source) -> list[int]:
    return sorted(int(a) for r in source.records for a in r.annotation_ids)


def _only_problem(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


# --------------------------------------------------------------------------- valid input


def test_valid_dataset_loads_with_crowd_grayscale_rgba_palette_and_empty_image(coco_set) -> None:
    source, problems, summary = validate_coco(coco_set.ann_path, coco_set.images_dir)

    assert problems == []
    assert source is not None
    assert _image_ids(source) == ALL_IMAGE_IDS
    assert _ann_ids(source) == ALL_ANN_IDS
    by_id = {r.image_id: r for r in source.records}
    # xywh -> xyxy, absolute pixels
    np.testing.assert_array_equal(by_id[1].boxes, [[10, 10, 30, 25], [0, 0, 64, 48]])
    assert by_id[1].boxes.dtype == np.float32
    np.testing.assert_array_equal(by_id[1].category_ids, [3, 7])
    # crowd kept with iscrowd True
    np.testing.assert_array_equal(by_id[2].iscrowd, [False, True])
    # image without annotations is valid and empty
    assert by_id[4].boxes.shape == (0, 4)
    assert (by_id[5].width, by_id[5].height) == (100, 70)
    # reader returns the file's bytes untouched
    assert source.image_reader(by_id[3]) == (coco_set.images_dir / "c.png").read_bytes()

    assert summary["images"] == 5
    assert summary["annotations"] == 6
    assert summary["crowd"] == 1
    assert summary["categories"] == [
        {"id": 3, "name": "cat", "count": 1},
        {"id": 7, "name": "dog", "count": 2},
        {"id": 90, "name": "bird", "count": 2},
    ]
    # sqrt(area): 17.3, 55.4, 10, 5.4, 34.6 (the crowd region is not counted)
    assert summary["size_histogram"] == {
        "<8": 1,
        "8-16": 1,
        "16-32": 1,
        "32-64": 2,
        "64-128": 0,
        ">=128": 0,
    }
    assert summary["images_dropped"] == 0
    assert summary["annotations_dropped"] == 0


def test_load_coco_valid_returns_source(coco_set) -> None:
    source = load_coco(coco_set.ann_path, coco_set.images_dir, verify_images=True)
    assert _image_ids(source) == ALL_IMAGE_IDS
    assert source.num_classes == 3
    assert source.category_names == ["cat", "dog", "bird"]


# --------------------------------------------------------------------------- file-level problems


def test_malformed_json_is_a_file_level_problem_with_position(coco_factory) -> None:
    ds = coco_factory(raw_json='{"images": [\n  {"id": 1,,}\n]}')
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir)

    assert source is None
    problem = _only_problem(problems)
    assert problem.file == str(ds.ann_path)
    assert problem.record == "-"
    assert "malformed JSON at line 2, column" in problem.message
    with pytest.raises(DatasetError):
        load_coco(ds.ann_path, ds.images_dir, skip_invalid=True)  # nothing to skip to


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(coco_factory, base_coco, key: str) -> None:
    del base_coco[key]
    ds = coco_factory(base_coco)
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir)

    assert source is None
    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(ds.ann_path), "-")
    assert f"missing top-level key '{key}'" in problem.message


def test_missing_annotation_file(tmp_path) -> None:
    source, problems, _ = validate_coco(tmp_path / "nope.json", tmp_path)
    assert source is None
    assert _only_problem(problems).message == "annotation file not found"


# --------------------------------------------------------------------------- record problems


def test_image_missing_required_key_drops_image_and_its_annotations(coco_factory, base_coco) -> None:
    del base_coco["images"][1]["width"]  # image id=2 (b.png)
    ds = coco_factory(base_coco)
    source, problems, summary = validate_coco(ds.ann_path, ds.images_dir)

    problem = _only_problem(problems)  # its two annotations are not reported again
    assert problem.file == str(ds.ann_path)
    assert problem.record == "image id=2 (b.png)"
    assert "width" in problem.message
    assert _image_ids(source) == [1, 3, 4, 5]
    assert _ann_ids(source) == [1, 2, 5, 6]
    assert summary["images_dropped"] == 1
    assert summary["annotations_dropped"] == 2


def test_annotation_wrong_types(coco_factory, base_coco) -> None:
    base_coco["annotations"][0]["bbox"] = "10,10,20,15"  # annotation id=1
    base_coco["annotations"][2]["category_id"] = "90"  # annotation id=3
    base_coco["annotations"][5]["bbox"] = [30, 20, None, 30]  # annotation id=6
    ds = coco_factory(base_coco)
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir)

    assert [p.record for p in problems] == ["annotation id=1", "annotation id=3", "annotation id=6"]
    assert all(p.file == str(ds.ann_path) for p in problems)
    assert "'bbox'" in problems[0].message
    assert "'category_id' must be an integer" in problems[1].message
    assert _ann_ids(source) == [2, 4, 5]
    assert _image_ids(source) == ALL_IMAGE_IDS  # a bad annotation drops only itself


def test_image_wrong_type(coco_factory, base_coco) -> None:
    base_coco["images"][0]["height"] = "48"
    ds = coco_factory(base_coco)
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir)

    problem = _only_problem(problems)
    assert problem.record == "image id=1 (a.png)"
    assert "'height' must be an integer" in problem.message
    assert _image_ids(source) == [2, 3, 4, 5]


def test_category_missing_name(coco_factory, base_coco) -> None:
    del base_coco["categories"][0]["name"]  # category id=7: its annotations go with it
    ds = coco_factory(base_coco)
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir)

    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(ds.ann_path), "category id=7")
    assert "name" in problem.message
    assert [c.id for c in source.categories] == [3, 90]
    assert _ann_ids(source) == [1, 3, 4, 6]


def test_duplicate_image_id(coco_factory, base_coco) -> None:
    base_coco["images"].append({"id": 1, "file_name": "b.png", "width": 80, "height": 60})
    ds = coco_factory(base_coco)
    source, problems, summary = validate_coco(ds.ann_path, ds.images_dir)

    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(ds.ann_path), "image id=1 (b.png)")
    assert "duplicate image id" in problem.message
    assert _image_ids(source) == ALL_IMAGE_IDS
    assert source.records[0].file_name == "a.png"  # the first one wins
    assert summary["images_dropped"] == 1


def test_duplicate_annotation_id(coco_factory, base_coco) -> None:
    base_coco["annotations"].append({"id": 6, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0})
    ds = coco_factory(base_coco)
    source, problems, summary = validate_coco(ds.ann_path, ds.images_dir)

    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(ds.ann_path), "annotation id=6")
    assert "duplicate annotation id" in problem.message
    assert _ann_ids(source) == ALL_ANN_IDS
    assert summary["annotations_dropped"] == 1


def test_duplicate_category_id(coco_factory, base_coco) -> None:
    base_coco["categories"].append({"id": 3, "name": "another cat"})
    ds = coco_factory(base_coco)
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir)

    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(ds.ann_path), "category id=3")
    assert "duplicate category id" in problem.message
    assert sorted((c.id, c.name) for c in source.categories) == [(3, "cat"), (7, "dog"), (90, "bird")]
    assert _ann_ids(source) == ALL_ANN_IDS


def test_unknown_category_id(coco_factory, base_coco) -> None:
    base_coco["annotations"][4]["category_id"] = 4  # annotation id=5
    ds = coco_factory(base_coco)
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir)

    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(ds.ann_path), "annotation id=5")
    assert "unknown category id 4" in problem.message
    assert _ann_ids(source) == [1, 2, 3, 4, 6]


def test_annotation_of_unknown_image(coco_factory, base_coco) -> None:
    base_coco["annotations"][0]["image_id"] = 99  # annotation id=1
    ds = coco_factory(base_coco)
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir)

    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(ds.ann_path), "annotation id=1")
    assert "image_id 99 is not in images" in problem.message
    assert _ann_ids(source) == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("bbox", [[10, 10, 0, 5], [10, 10, 5, -3]])
def test_bbox_with_non_positive_size(coco_factory, base_coco, bbox: list[float]) -> None:
    base_coco["annotations"][2]["bbox"] = bbox  # annotation id=3
    ds = coco_factory(base_coco)
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir)

    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(ds.ann_path), "annotation id=3")
    assert "non-positive width/height" in problem.message
    assert _ann_ids(source) == [1, 2, 4, 5, 6]


@pytest.mark.parametrize(
    "bbox",
    [
        [-1.5, 0, 10, 10],  # x < -1
        [0, -2, 10, 10],  # y < -1
        [60, 0, 5.5, 10],  # x + w = 65.5 > 64 + 1
        [0, 40, 10, 9.5],  # y + h = 49.5 > 48 + 1
    ],
)
def test_bbox_outside_image(coco_factory, base_coco, bbox: list[float]) -> None:
    base_coco["annotations"][0]["bbox"] = bbox  # annotation id=1 on image 1 (64x48)
    ds = coco_factory(base_coco)
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir)

    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(ds.ann_path), "annotation id=1")
    assert "outside image id=1 (64x48)" in problem.message
    assert _ann_ids(source) == [2, 3, 4, 5, 6]


def test_bbox_within_one_pixel_tolerance_is_kept(coco_factory, base_coco) -> None:
    base_coco["annotations"][0]["bbox"] = [-1, -1, 66, 50]  # exactly at the tolerance
    ds = coco_factory(base_coco)
    _, problems, _ = validate_coco(ds.ann_path, ds.images_dir)
    assert problems == []


@pytest.mark.parametrize("verify_images", [True, False])
def test_missing_image_file(coco_factory, verify_images: bool) -> None:
    ds = coco_factory()
    ds.image_path("b.png").unlink()
    source, problems, summary = validate_coco(ds.ann_path, ds.images_dir, verify_images=verify_images)

    problem = _only_problem(problems)
    assert problem.file == str(ds.image_path("b.png"))
    assert problem.record == "image id=2 (b.png)"
    assert "not found" in problem.message
    assert _image_ids(source) == [1, 3, 4, 5]
    assert _ann_ids(source) == [1, 2, 5, 6]  # its annotations go with it
    assert (summary["images_dropped"], summary["annotations_dropped"]) == (1, 2)


def test_missing_images_folder_is_one_problem(coco_set, tmp_path) -> None:
    source, problems, _ = validate_coco(coco_set.ann_path, tmp_path / "nowhere")
    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(tmp_path / "nowhere"), "-")
    assert source.records == []


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_corrupt_image_file(coco_factory, content) -> None:
    ds = coco_factory()
    path = ds.image_path("e.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "truncated" else content)

    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir, verify_images=True)

    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(path), "image id=5 (e.jpg)")
    assert "unreadable or corrupt image" in problem.message
    assert _image_ids(source) == [1, 2, 3, 4]
    assert _ann_ids(source) == [1, 2, 3, 4, 5]
    # without verification only existence is checked
    _, quick, _ = validate_coco(ds.ann_path, ds.images_dir, verify_images=False)
    assert quick == []


def test_image_size_differs_from_declared(coco_factory, base_coco) -> None:
    base_coco["images"][2]["width"] = 51  # c.png is really 50x50
    base_coco["annotations"][4]["bbox"] = [10, 10, 5, 5]
    ds = coco_factory(base_coco)
    source, problems, _ = validate_coco(ds.ann_path, ds.images_dir, verify_images=True)

    problem = _only_problem(problems)
    assert (problem.file, problem.record) == (str(ds.image_path("c.png")), "image id=3 (c.png)")
    assert "real size 50x50 differs from declared 51x50" in problem.message
    assert _image_ids(source) == [1, 2, 4, 5]
    assert _ann_ids(source) == [1, 2, 3, 4, 6]


# --------------------------------------------------------------------------- load_coco policy


def _several_bad(base_coco: dict[str, Any]) -> dict[str, Any]:
    base_coco["annotations"][0]["bbox"] = [10, 10, 0, 0]  # annotation id=1
    base_coco["annotations"][5]["category_id"] = 5  # annotation id=6
    return base_coco


def test_load_coco_raises_with_every_problem(coco_factory, base_coco) -> None:
    ds = coco_factory(_several_bad(base_coco))
    ds.image_path("c.png").unlink()  # image id=3 and annotation id=5

    with pytest.raises(DatasetError) as info:
        load_coco(ds.ann_path, ds.images_dir)

    records = sorted(p.record for p in info.value.problems)
    assert records == ["annotation id=1", "annotation id=6", "image id=3 (c.png)"]
    text = str(info.value)
    assert len(text.splitlines()) == 3
    assert f"{ds.ann_path}: annotation id=1: " in text
    assert isinstance(info.value, ValueError)


def test_load_coco_skip_invalid_drops_exactly_the_bad_records(coco_factory, base_coco, caplog) -> None:
    ds = coco_factory(_several_bad(base_coco))
    ds.image_path("c.png").unlink()

    with caplog.at_level(logging.WARNING, logger="detkd.data"):
        source = load_coco(ds.ann_path, ds.images_dir, skip_invalid=True)

    assert _image_ids(source) == [1, 2, 4, 5]
    assert _ann_ids(source) == [2, 3, 4]
    warnings = [r for r in caplog.records if r.name == "detkd.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "1 image(s) and 3 annotation(s) dropped" in message


def test_load_coco_verify_images_flag(coco_factory) -> None:
    ds = coco_factory()
    ds.image_path("a.png").write_bytes(b"garbage")
    load_coco(ds.ann_path, ds.images_dir)  # cheap mode only checks existence
    with pytest.raises(DatasetError) as info:
        load_coco(ds.ann_path, ds.images_dir, verify_images=True)
    assert [p.record for p in info.value.problems] == ["image id=1 (a.png)"]
