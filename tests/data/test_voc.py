"""validate_voc / load_voc / write_voc on real files: VOC's pixel rule, difficult objects, located problems."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from factories import FORMAT_CLASSES, FORMAT_IMAGES, write_all_formats, write_image

from detkd.data.coco import load_coco
from detkd.data.dataset import DetectionDataset
from detkd.data.records import DatasetError, image_record_name
from detkd.data.voc import VOC_CLASSES, load_voc, validate_voc, write_voc


def _only(problems):
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def _xml(
    root: Path,
    voc_id: str,
    objects: str = "",
    *,
    size: str = "<size><width>20</width><height>10</height></size>",
    filename: str | None = None,
) -> None:
    name = f"<filename>{filename}</filename>" if filename is not None else ""
    path = root / "Annotations" / f"{voc_id}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation>{name}{size}{objects}</annotation>\n")


def _obj(name: str | None, box: tuple | None = (1, 1, 10, 5), difficult: str | None = None) -> str:
    parts = f"<name>{name}</name>" if name is not None else ""
    if difficult is not None:
        parts += f"<difficult>{difficult}</difficult>"
    if box is not None:
        parts += "<bndbox>" + "".join(
            f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
        )
        parts += "</bndbox>"
    return f"<object>{parts}</object>"


def _split(root: Path, name: str, lines: list[str]) -> Path:
    path = root / "ImageSets/Main" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# --------------------------------------------------------------------------- valid data


def test_pixel_rule_difficult_and_default_file_name(tmp_path):
    write_image(tmp_path / "JPEGImages/one.jpg", 20, 10)
    write_image(tmp_path / "JPEGImages/two.png", 30, 20, seed=1)
    # a whole-image box is 1 1 W H; xmin == xmax is one pixel wide
    _xml(tmp_path, "one", _obj("dog", (1, 1, 20, 10)) + _obj("cat", (5, 3, 5, 3), difficult="1"))
    _xml(tmp_path, "two", size="<size><width>30</width><height>20</height></size>", filename="two.png")
    _split(tmp_path, "trainval", ["one", "", "two"])

    source, problems, summary = validate_voc(tmp_path, "trainval")
    assert problems == []
    assert source.category_names == list(VOC_CLASSES)
    assert [c.id for c in source.sorted_categories] == list(range(20))
    one, two = source.records
    assert (one.image_id, one.file_name, two.image_id, two.file_name) == (1, "one.jpg", 2, "two.png")
    np.testing.assert_array_equal(one.boxes, [[0, 0, 20, 10], [4, 2, 5, 3]])
    np.testing.assert_array_equal(one.category_ids, [VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")])
    np.testing.assert_array_equal(one.iscrowd, [False, True])  # difficult: an ignore region
    assert two.num_annotations == 0
    assert summary["crowd"] == 1 and summary["annotations"] == 2
    # training never sees the difficult object
    assert DetectionDataset(source).target_of(one)["boxes"].tolist() == [[0, 0, 20, 10]]


def test_custom_classes_give_ids_in_list_order(tmp_path):
    paths = write_all_formats(tmp_path, FORMAT_IMAGES, FORMAT_CLASSES)
    source = load_voc(paths.voc, "train", classes=["bird", "cat", "dog"], verify_images=True)
    assert [(c.id, c.name) for c in source.sorted_categories] == [(0, "bird"), (1, "cat"), (2, "dog")]
    assert source.records[0].category_ids.tolist() == [1, 2]  # cat, dog
    assert [r.file_name for r in source.records] == ["a.png", "b.png", "c.png", "sub/d.png"]


# --------------------------------------------------------------------------- one corpus, every record problem


@pytest.fixture
def broken_voc(tmp_path) -> Path:
    root = tmp_path / "voc"
    images = root / "JPEGImages"
    for name in ("ok", "objs", "wrongsize", "nofilename"):
        write_image(images / f"{name}.jpg", 20, 10)
    write_image(images / "rotated.jpg", 20, 10, orientation=8)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    _xml(root, "ok", _obj("dog"), filename="ok.jpg")
    (root / "Annotations/malformed.xml").write_text("<annotation>\n  <size><width>20</width>\n</annotation>\n")
    _xml(root, "nosize", _obj("dog"), size="", filename="ok.jpg")
    _xml(root, "badsize", size="<size><width>abc</width><height>10</height></size>", filename="ok.jpg")
    _xml(
        root,
        "objs",
        _obj("dog")  # 1 valid
        + _obj("zebra")  # 2 unknown class
        + _obj(None)  # 3 no name
        + _obj("cat", (1, 1, 25, 5))  # 4 outside the 20x10 image
        + _obj("cat", (8, 1, 4, 5))  # 5 empty: xmin > xmax
        + _obj("cat", difficult="2")  # 6 bad difficult
        + _obj("cat", box=None)  # 7 no bndbox
        + _obj("cat", ("a", 1, 2, 3))  # 8 not numbers
        + _obj("cat", (2, 2, 6, 6), difficult="1"),  # 9 valid, difficult
        filename="objs.jpg",
    )
    _xml(root, "noimage", filename="noimage.jpg")
    _xml(root, "wrongsize", size="<size><width>30</width><height>30</height></size>", filename="wrongsize.jpg")
    _xml(root, "corrupt", filename="corrupt.jpg")
    _xml(root, "rotated", filename="rotated.jpg")
    (root / "Annotations/roottag.xml").write_text("<foo><size><width>20</width><height>10</height></size></foo>")
    _xml(root, "nofilename")  # no <filename>: nofilename.jpg
    _split(
        root,
        "train",
        [
            "ok",  # 1
            "",  # 2
            "nofile",  # 3 no XML
            "ok",  # 4 listed twice
            "two tokens",  # 5
            "malformed",  # 6
            "nosize",  # 7
            "badsize",  # 8
            "objs",  # 9
            "noimage",  # 10
            "wrongsize",  # 11
            "corrupt",  # 12
            "rotated",  # 13
            "roottag",  # 14
            "nofilename",  # 15
        ],
    )
    return root


def test_every_problem_is_reported_once_with_its_file_and_record(broken_voc):
    root = broken_voc
    classes = ["cat", "dog"]
    source, problems, summary = validate_voc(root, "train", classes=classes)

    split_file = str(root / "ImageSets/Main/train.txt")
    objs = str(root / "Annotations/objs.xml")
    images = root / "JPEGImages"
    # image ids follow the split file's valid lines: ok 1, nofile 2, malformed 3, ..., nofilename 12
    expected = {
        (split_file, "line 3"): "image id 'nofile' has no annotation file",
        (split_file, "line 4"): "listed twice (first: line 1)",
        (split_file, "line 5"): "expected one image id",
        (str(root / "Annotations/malformed.xml"), "-"): "malformed XML at line 3, column 3: mismatched tag",
        (str(root / "Annotations/nosize.xml"), "size"): "missing <size>",
        (str(root / "Annotations/badsize.xml"), "size"): "positive integer <width> and <height>",
        (objs, "object 2 (zebra)"): "unknown class 'zebra' (classes: cat, dog)",
        (objs, "object 3"): "missing <name>",
        (objs, "object 4 (cat)"): "lies outside the 20x10 image",
        (objs, "object 5 (cat)"): "empty box",
        (objs, "object 6 (cat)"): "<difficult> must be 0 or 1",
        (objs, "object 7 (cat)"): "missing <bndbox>",
        (objs, "object 8 (cat)"): "needs numbers",
        (str(images / "noimage.jpg"), image_record_name(7, "noimage.jpg")): "image file not found",
        (str(images / "wrongsize.jpg"), image_record_name(8, "wrongsize.jpg")): "real size 20x10 differs",
        (str(images / "corrupt.jpg"), image_record_name(9, "corrupt.jpg")): "unreadable or corrupt",
        (str(images / "rotated.jpg"), image_record_name(10, "rotated.jpg")): "EXIF orientation 8",
        (str(root / "Annotations/roottag.xml"), "-"): "root element must be <annotation>",
    }
    assert len(problems) == len(expected), "\n".join(map(str, problems))
    for problem in problems:
        assert expected[(problem.file, problem.record)] in problem.message, str(problem)

    assert [(r.image_id, r.file_name) for r in source.records] == [
        (1, "ok.jpg"),
        (6, "objs.jpg"),
        (12, "nofilename.jpg"),
    ]
    objs_record = source.records[1]
    np.testing.assert_array_equal(objs_record.boxes, [[0, 0, 10, 5], [1, 1, 6, 6]])
    np.testing.assert_array_equal(objs_record.iscrowd, [False, True])
    assert summary["images"] == 3 and summary["images_dropped"] == 9
    # objects in parsed XMLs: ok 1, nosize 1, objs 9, nofilename 0; kept 1 + 2
    assert summary["annotations"] == 3 and summary["annotations_dropped"] == 8


def test_load_voc_refuses_or_skips_with_a_warning(broken_voc, caplog):
    with pytest.raises(DatasetError) as err:
        load_voc(broken_voc, "train", classes=["cat", "dog"])
    assert len(err.value.problems) == 18
    with caplog.at_level(logging.WARNING, logger="detkd.data"):
        source = load_voc(broken_voc, "train", classes=["cat", "dog"], skip_invalid=True)
    assert len(source.records) == 3 and "18 problem(s)" in caplog.text


def test_unusable_root_split_or_classes(tmp_path):
    _split(tmp_path, "train", ["a"])
    source, problems, _ = validate_voc(tmp_path, "val")
    problem = _only(problems)
    assert source is None and problem.file == str(tmp_path / "ImageSets/Main/val.txt")
    assert "split file not found (splits here: ['train'])" in problem.message
    source, problems, _ = validate_voc(tmp_path / "nope", "train")
    assert source is None and _only(problems).message == "VOC dataset folder not found"
    source, problems, _ = validate_voc(tmp_path, "train", classes=["a", "b", "a"])
    assert source is None and "repeated: ['a']" in _only(problems).message
    source, problems, _ = validate_voc(tmp_path, "train", classes=[])
    assert source is None and _only(problems).record == "classes"


# --------------------------------------------------------------------------- writer


def test_write_voc_round_trip_from_coco_keeps_crowd_as_difficult(coco_set, tmp_path):
    source = load_coco(coco_set.ann_path, coco_set.images_dir)
    classes = write_voc(tmp_path / "voc", {"trainval": source})
    assert classes == source.category_names

    back = load_voc(tmp_path / "voc", "trainval", classes=classes, verify_images=True)
    assert [r.file_name for r in back.records] == [r.file_name for r in source.records]
    for rec, got in zip(source.records, back.records, strict=True):
        np.testing.assert_allclose(got.boxes, rec.boxes, atol=1e-4)
        np.testing.assert_array_equal(got.iscrowd, rec.iscrowd)
        assert back.labels_of(got.category_ids).tolist() == source.labels_of(rec.category_ids).tolist()
        assert back.image_reader(got) == source.image_reader(rec)
    assert (tmp_path / "voc/ImageSets/Main/trainval.txt").read_text().split() == ["a", "b", "c", "d", "e"]


def test_write_voc_refuses_boxes_under_one_pixel(coco_factory, base_coco, tmp_path):
    base_coco["annotations"][0]["bbox"] = [10, 10, 0.5, 4]
    data = coco_factory(base_coco)
    source = load_coco(data.ann_path, data.images_dir)
    with pytest.raises(ValueError, match="under 1 px"):
        write_voc(tmp_path / "voc", {"train": source})
