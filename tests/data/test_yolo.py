"""validate_yolo / load_yolo / write_yolo on real files: every problem located by file and line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from factories import FORMAT_CLASSES, FORMAT_IMAGES, YOLO_TOLERANCE_PX, write_all_formats, write_image, write_yaml

from detkd.data.coco import load_coco
from detkd.data.dataset import DetectionDataset
from detkd.data.records import DatasetError, image_record_name
from detkd.data.yolo import label_path, load_yolo, validate_yolo, write_yolo
from detkd.engine.coco_eval import coco_metrics


def _located(problems) -> set[tuple[str, str]]:
    return {(p.file, p.record) for p in problems}


def _only(problems):
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


# --------------------------------------------------------------------------- valid data


def test_label_path_replaces_the_last_images_folder():
    assert label_path(Path("/d/images/x/images/a.b.jpg")) == Path("/d/images/x/labels/a.b.txt")
    assert label_path(Path("/d/pics/a.png")) == Path("/d/pics/a.txt")


def test_valid_split_reads_boxes_names_and_images_without_labels(tmp_path):
    paths = write_all_formats(tmp_path, FORMAT_IMAGES, FORMAT_CLASSES)
    source, problems, summary = validate_yolo(paths.yolo, "train")

    assert problems == []
    assert [(c.id, c.name) for c in source.categories] == [(0, "cat"), (1, "dog"), (2, "bird")]
    # ids 1..N in sorted path order; file names relative to the split's folder
    assert [(r.image_id, r.file_name) for r in source.records] == [
        (1, "a.png"),
        (2, "b.png"),
        (3, "c.png"),
        (4, "sub/d.png"),
    ]
    assert source.image_reader.root == paths.yolo.parent / "images/train"
    a, b, c, d = source.records
    assert (a.width, a.height) == (64, 48)  # from the image header
    np.testing.assert_allclose(a.boxes, [[10, 10, 30, 25], [0, 0, 64, 48]], atol=YOLO_TOLERANCE_PX)
    np.testing.assert_array_equal(a.category_ids, [0, 1])
    assert c.boxes.shape == (0, 4)  # no label file: an image without objects
    assert not any(r.iscrowd.any() for r in source.records)
    np.testing.assert_array_equal(np.concatenate([r.annotation_ids for r in source.records]), [1, 2, 3, 4, 5])
    assert source.image_reader(d) == (paths.yolo.parent / "images/train/sub/d.png").read_bytes()
    assert summary["images"] == 4 and summary["annotations"] == 5 and summary["images_dropped"] == 0
    assert summary["categories"][0] == {"id": 0, "name": "cat", "count": 1}


def test_yaml_forms_path_names_dict_nc_list_files_and_polygons(tmp_path):
    ds = tmp_path / "ds"
    write_image(ds / "images/a/x.png", 20, 10)
    write_image(ds / "images/b/y.png", 40, 20, seed=1)
    write_image(ds / "images/b/z.jpg", 10, 10, seed=2)
    (ds / "labels/a").mkdir(parents=True)
    # blank lines are ignored; a polygon line becomes its bounding box
    (ds / "labels/a/x.txt").write_text("\n1 0.5 0.5 0.5 0.4\n\n0 0.1 0.2 0.5 0.2 0.3 0.8\n")
    (ds / "labels/b").mkdir(parents=True)
    (ds / "labels/b/y.txt").write_text("")  # empty label file: no objects
    lists = ds / "lists"
    lists.mkdir()
    (lists / "val.txt").write_text(f"../images/b/y.png\n{ds / 'images/b/z.jpg'}\n")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    yaml_path = write_yaml(
        cfg / "data.yaml",
        {
            "path": "../ds",
            "train": ["images/a", "lists/val.txt"],
            "val": "lists/val.txt",
            "nc": 2,
            "names": {0: "a", 1: "b"},
        },
    )

    train, problems, _ = validate_yolo(yaml_path, "train")
    assert problems == []
    # a list of a folder and a list file: names relative to their common parent folder
    assert source_names(train) == ["a/x.png", "b/y.png", "b/z.jpg"]
    assert train.image_reader.root == ds / "images"
    x = train.records[0]
    np.testing.assert_allclose(x.boxes, [[5, 3, 15, 7], [2, 2, 10, 8]], atol=1e-5)
    np.testing.assert_array_equal(x.category_ids, [1, 0])
    assert train.records[1].num_annotations == 0

    val, problems, _ = validate_yolo(yaml_path, "val")
    assert problems == [] and source_names(val) == ["y.png", "z.jpg"]

    # no `path`: the yaml's folder; `nc` alone names the classes class_0...
    write_yaml(ds / "nc_only.yaml", {"train": "images/a", "nc": 2})
    only_nc, problems, _ = validate_yolo(ds / "nc_only.yaml", "train")
    assert problems == [] and only_nc.category_names == ["class_0", "class_1"]


def source_names(source) -> list[str]:
    return [r.file_name for r in source.records]


def test_coordinates_within_epsilon_pass_and_are_clipped(tmp_path):
    write_image(tmp_path / "images/x.png", 100, 50)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels/x.txt").write_text("0 1.0000005 0.5 0.2 0.2\n0 0.5 0.5 1.00001 0.2\n0 0.05 0.5 0.2 0.2\n")
    write_yaml(tmp_path / "data.yaml", {"train": "images", "names": ["a"]})
    source, problems, _ = validate_yolo(tmp_path / "data.yaml", "train")
    assert _located(problems) == {(str(tmp_path / "labels/x.txt"), "line 2")}
    np.testing.assert_allclose(source.records[0].boxes, [[90, 20, 100, 30], [0, 20, 15, 30]], atol=1e-3)


# --------------------------------------------------------------------------- one corpus, every record problem


@pytest.fixture
def broken_yolo(tmp_path) -> Path:
    images = tmp_path / "images/train"
    labels = tmp_path / "labels/train"
    labels.mkdir(parents=True)
    write_image(images / "ok.png", 20, 10)
    (labels / "ok.txt").write_text("0 0.5 0.5 0.5 0.5\n\n1 0.25 0.25 0.2 0.2\n")
    write_image(images / "nolabel.png", 20, 10)
    write_image(images / "bad.png", 20, 10)
    (labels / "bad.txt").write_text(
        "0 0.5 0.5 0.2\n"  # 1 malformed: 4 values
        "0 0.5 0.5 0.2 0.2\n"  # 2 valid
        "x 0.5 0.5 0.2 0.2\n"  # 3 not numbers
        "1.5 0.5 0.5 0.2 0.2\n"  # 4 class not an integer
        "2 0.5 0.5 0.2 0.2\n"  # 5 class outside names
        "0 1.2 0.5 0.2 0.2\n"  # 6 outside [0, 1]
        "0 0.5 0.5 0 0.2\n"  # 7 zero-size
        "0 0.5 0.5 0.2 0.2 0.3\n"  # 8 malformed: 6 values
        "1 0.1 0.1 0.3 0.1 0.3 0.4\n"  # 9 valid polygon
        "-1 0.5 0.5 0.2 0.2\n"  # 10 class outside names
    )
    (images / "corrupt.png").write_bytes(b"not an image at all")
    write_image(images / "rotated.jpg", 20, 10, orientation=6)
    write_image(images / "latin.png", 20, 10)
    (labels / "latin.txt").write_bytes(b"0 0.5 0.5 0.2 0.2 \xff\xfe\n")
    write_image(tmp_path / "images/more/m.png", 30, 30)
    (tmp_path / "extra.txt").write_text(
        "./images/train/ok.png\n"  # 1 listed twice (the folder has it)
        "\n"
        "images/more/missing.png\n"  # 3 not found
        "notes.md\n"  # 4 not an image file
        f"{tmp_path / 'images/more/m.png'}\n"  # 5 valid, absolute
    )
    write_yaml(tmp_path / "data.yaml", {"path": ".", "train": ["images/train", "extra.txt"], "names": ["a", "b"]})
    return tmp_path


def test_every_problem_is_reported_once_with_its_file_and_line(broken_yolo):
    root = broken_yolo
    source, problems, summary = validate_yolo(root / "data.yaml", "train")

    bad, extra = str(root / "labels/train/bad.txt"), str(root / "extra.txt")
    # ids: sorted paths of every image named: more/m, more/missing, train/bad, corrupt, latin, nolabel, ok, rotated
    expected = {
        (bad, "line 1"): "malformed line",
        (bad, "line 3"): "not numbers",
        (bad, "line 4"): "class must be an integer",
        (bad, "line 5"): "class id 2 is not in names (0..1)",
        (bad, "line 6"): "normalised to [0, 1]",
        (bad, "line 7"): "zero-size box",
        (bad, "line 8"): "malformed line",
        (bad, "line 10"): "class id -1 is not in names",
        (str(root / "images/train/corrupt.png"), image_record_name(4, "train/corrupt.png")): "unreadable or corrupt",
        (str(root / "images/train/rotated.jpg"), image_record_name(8, "train/rotated.jpg")): "EXIF orientation 6",
        (str(root / "labels/train/latin.txt"), "-"): "cannot read label file",
        (extra, "line 1"): "listed twice",
        (extra, "line 3"): "not found",
        (extra, "line 4"): "not an image file",
    }
    assert len(problems) == len(expected), "\n".join(map(str, problems))
    for problem in problems:
        assert expected[(problem.file, problem.record)] in problem.message, str(problem)

    assert source.image_reader.root == root / "images"  # common parent of the folder and the listed images
    kept = {r.file_name: r for r in source.records}
    assert [(r.image_id, r.file_name) for r in source.records] == [
        (1, "more/m.png"),
        (3, "train/bad.png"),
        (6, "train/nolabel.png"),
        (7, "train/ok.png"),
    ]
    assert kept["train/nolabel.png"].num_annotations == 0
    # bad.txt keeps lines 2 and 9 (the polygon's bounding box)
    np.testing.assert_allclose(kept["train/bad.png"].boxes, [[8, 4, 12, 6], [2, 1, 6, 4]], atol=1e-5)
    assert summary["images"] == 4 and summary["images_dropped"] == 4
    # 12 label lines read (ok 2, bad 10); 2 boxes kept from bad, 2 from ok
    assert summary["annotations"] == 4 and summary["annotations_dropped"] == 8


def test_truncated_image_needs_verify_images(tmp_path):
    write_image(tmp_path / "images/t.png", 64, 64)
    data = (tmp_path / "images/t.png").read_bytes()
    (tmp_path / "images/t.png").write_bytes(data[: len(data) // 2])
    write_yaml(tmp_path / "data.yaml", {"train": "images", "names": ["a"]})
    assert validate_yolo(tmp_path / "data.yaml", "train", verify_images=False)[1] == []
    problem = _only(validate_yolo(tmp_path / "data.yaml", "train")[1])
    assert problem.file == str(tmp_path / "images/t.png") and "corrupt" in problem.message


def test_load_yolo_refuses_or_skips_with_a_warning(broken_yolo, caplog):
    with pytest.raises(DatasetError) as err:
        load_yolo(broken_yolo / "data.yaml", "train")
    assert len(err.value.problems) == 14
    with caplog.at_level(logging.WARNING, logger="detkd.data"):
        source = load_yolo(broken_yolo / "data.yaml", "train", skip_invalid=True)
    assert len(source.records) == 4
    assert "14 problem(s), 4 image(s) and 8 annotation(s) dropped" in caplog.text


# --------------------------------------------------------------------------- data.yaml problems


@pytest.mark.parametrize(
    ("text", "split", "record", "message"),
    [
        ("train: [a\nnames: [x]\n", "train", "-", "malformed YAML at line 2"),
        ("- a\n", "train", "-", "top level must be a mapping"),
        ("train: images\n", "train", "key 'names'", "missing"),
        ("train: images\nnames: cat\n", "train", "key 'names'", "must be a list or a mapping"),
        ("train: images\nnames: {0: a, 2: b}\n", "train", "key 'names'", "without gaps"),
        ("train: images\nnames: [a, null]\n", "train", "key 'names'", "non-empty string"),
        ("train: images\nnc: 3\nnames: [a, b]\n", "train", "key 'nc'", "nc is 3 but 'names' has 2"),
        ("train: images\nnames: [a]\n", "val", "key 'val'", "no val split"),
        ("train: 5\nnames: [a]\n", "train", "key 'train'", "must be a folder or list file"),
        ("train: images/nope\nnames: [a]\n", "train", "key 'train'", "not found"),
        ("train: empty\nnames: [a]\n", "train", "key 'train'", "no images found"),
        ("path: nowhere\ntrain: images\nnames: [a]\n", "train", "key 'path'", "not found"),
        ("train: images\nnames: [a]\n", "trainval", "-", "split must be one of train, val, test"),
    ],
)
def test_data_yaml_problems_name_the_key(tmp_path, text, split, record, message):
    write_image(tmp_path / "images/x.png", 8, 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.yaml").write_text(text)
    source, problems, summary = validate_yolo(tmp_path / "data.yaml", split)
    problem = _only(problems)
    assert source is None and summary["images"] == 0
    assert (problem.file, problem.record) == (str(tmp_path / "data.yaml"), record)
    assert message in problem.message, str(problem)


def test_missing_yaml_and_empty_list_file(tmp_path):
    problem = _only(validate_yolo(tmp_path / "nope.yaml", "train")[1])
    assert (problem.file, problem.message) == (str(tmp_path / "nope.yaml"), "data.yaml not found")
    (tmp_path / "list.txt").write_text("\n\n")
    write_yaml(tmp_path / "data.yaml", {"train": "list.txt", "names": ["a"]})
    source, problems, _ = validate_yolo(tmp_path / "data.yaml", "train")
    assert source is None and _only(problems).file == str(tmp_path / "list.txt")


# --------------------------------------------------------------------------- downstream


def test_class_zero_trains_as_label_one_and_evaluates_with_both_coco_backends(tmp_path):
    paths = write_all_formats(tmp_path, FORMAT_IMAGES, FORMAT_CLASSES)
    source = load_yolo(paths.yolo, "train", verify_images=True)
    dataset = DetectionDataset(source, train=False)
    image, target = dataset[0]
    assert image.shape == (3, 48, 64)
    assert target["labels"].tolist() == [1, 2]  # classes 0 and 1

    gt = source.to_coco_dict()
    assert gt["categories"][0]["id"] == 0
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    for backend in ("faster", "pycocotools"):
        assert coco_metrics(gt, detections, backend=backend)["AP"] == pytest.approx(1.0)
    # a miss on class 0 lowers AP: category 0 is really scored
    missing_cat0 = [d for d in detections if d["category_id"] != 0]
    assert coco_metrics(gt, missing_cat0)["AP"] < 0.9


def test_write_yolo_round_trip_from_coco(coco_set, tmp_path):
    source = load_coco(coco_set.ann_path, coco_set.images_dir)
    data_yaml = write_yolo(tmp_path / "yolo", {"train": source, "val": source})
    back = load_yolo(data_yaml, "val", verify_images=True)

    assert back.category_names == source.category_names  # sparse ids 3, 7, 90 become classes 0, 1, 2
    assert source_names(back) == source_names(source)
    for rec, got in zip(source.records, back.records, strict=True):
        assert (got.width, got.height) == (rec.width, rec.height)
        assert source.image_reader(rec) == back.image_reader(got)  # bytes copied, never re-encoded
        keep = ~rec.iscrowd  # YOLO has no crowd regions
        expected = rec.boxes[keep].copy()
        expected[:, 0::2] = expected[:, 0::2].clip(0, rec.width)
        expected[:, 1::2] = expected[:, 1::2].clip(0, rec.height)
        np.testing.assert_allclose(got.boxes, expected, atol=YOLO_TOLERANCE_PX)
        assert back.labels_of(got.category_ids).tolist() == source.labels_of(rec.category_ids[keep]).tolist()
    assert not (tmp_path / "yolo/labels/val/d.txt").exists()  # no objects, no label file


def test_write_yolo_refuses_mismatched_categories_and_unknown_splits(coco_set, tmp_path):
    source = load_coco(coco_set.ann_path, coco_set.images_dir)
    with pytest.raises(ValueError, match="splits must be among"):
        write_yolo(tmp_path, {"trainval": source})
    other = load_coco(coco_set.ann_path, coco_set.images_dir)
    other.categories = other.categories[:2]
    with pytest.raises(ValueError, match="same categories"):
        write_yolo(tmp_path, {"train": source, "val": other})


def test_roboflow_style_parent_paths_fall_back_as_in_ultralytics(tmp_path):
    write_image(tmp_path / "ds/train/images/x.png", 8, 8)
    (tmp_path / "ds/train/labels").mkdir(parents=True)
    (tmp_path / "ds/train/labels/x.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    write_yaml(tmp_path / "ds/data.yaml", {"train": "../train/images", "nc": 1, "names": ["a"]})
    source, problems, _ = validate_yolo(tmp_path / "ds/data.yaml", "train")
    assert problems == [] and source.image_reader.root == tmp_path / "ds/train/images"
    np.testing.assert_allclose(source.records[0].boxes, [[2, 2, 6, 6]])
