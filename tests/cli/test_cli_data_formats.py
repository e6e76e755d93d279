"""``detkd data check / to-coco / to-parquet`` with YOLO and VOC datasets: tables, error lines, exit codes."""

from __future__ import annotations

import pytest
from factories import FORMAT_CLASSES, FORMAT_IMAGES, write_all_formats
from typer.testing import CliRunner

from detkd.cli import app
from detkd.data import open_source

runner = CliRunner()


@pytest.fixture
def formats(tmp_path):
    return write_all_formats(tmp_path / "data", FORMAT_IMAGES, FORMAT_CLASSES)


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_check_yolo_and_voc_print_the_same_table_as_coco(formats):
    coco = runner.invoke(app, ["data", "check", "--coco", str(formats.coco), "--images", str(formats.coco_images)])
    yolo = runner.invoke(app, ["data", "check", "--yolo", str(formats.yolo), "--split", "train"])
    voc = runner.invoke(
        app, ["data", "check", "--voc", str(formats.voc), "--split", "train", "--classes", "cat,dog,bird"]
    )
    for result in (coco, yolo, voc):
        assert result.exit_code == 0, result.output
        assert "no problems found" in result.output
        assert "category 0 cat" in result.output
    # the title names the split (the console may wrap a long temporary path anywhere in it)
    assert ".yaml#train" in "".join(yolo.output.split())
    # the table rows after the title agree (YOLO has no crowd region)
    rows = [line for line in voc.output.splitlines() if "category" in line or "sqrt(area)" in line]
    assert rows == [line for line in coco.output.splitlines() if "category" in line or "sqrt(area)" in line]


def test_check_reports_each_problem_with_file_and_line_and_exits_2(formats):
    labels = formats.yolo.parent / "labels/train/a.txt"
    labels.write_text(labels.read_text() + "7 0.5 0.5 0.1 0.1\n0 0.5 0.5\n")
    (formats.yolo.parent / "images/train/b.png").write_bytes(b"broken")
    result = runner.invoke(app, ["data", "check", "--yolo", str(formats.yolo), "--split", "train"])
    assert result.exit_code == 2
    errors = _errors(result.output)
    assert len(errors) == 3, result.output
    assert f"{labels}: line 3: class id 7 is not in names" in result.output
    assert f"{labels}: line 4: malformed line" in result.output
    assert "b.png" in result.output and "3 problem(s) found" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no dataset given"),
        (
            ["--coco", "a.json", "--images", "i", "--yolo", "d.yaml", "--split", "train"],
            "not both --coco/--images and --yolo",
        ),
        (["--yolo", "d.yaml"], "--yolo needs --split (train, val or test)"),
        (["--voc", "v"], "--voc needs --split"),
        (["--coco", "a.json"], "--coco needs --images"),
        (["--coco", "a.json", "--images", "i", "--split", "train"], "--split picks a split"),
        (["--yolo", "d.yaml", "--split", "train", "--classes", "a"], "--classes names the classes of a --voc"),
    ],
)
def test_check_argument_errors_exit_2(args, message):
    result = runner.invoke(app, ["data", "check", *args])
    assert result.exit_code == 2
    assert _errors(result.output) and message in result.output, result.output


def test_missing_data_yaml_is_one_error_line(tmp_path):
    result = runner.invoke(app, ["data", "check", "--yolo", str(tmp_path / "nope.yaml"), "--split", "val"])
    assert result.exit_code == 2
    assert _errors(result.output) == [f"error: {tmp_path / 'nope.yaml'}: -: data.yaml not found"]


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_to_coco_writes_a_file_that_checks_clean_against_the_printed_folder(formats, tmp_path, fmt):
    args = ["--yolo", str(formats.yolo)] if fmt == "yolo" else ["--voc", str(formats.voc), "--classes", "cat,dog,bird"]
    out = tmp_path / "out/ann.json"
    result = runner.invoke(app, ["data", "to-coco", *args, "--split", "train", "--out", str(out)])
    assert result.exit_code == 0, result.output
    folder = formats.yolo.parent / "images/train" if fmt == "yolo" else formats.voc / "JPEGImages"
    assert f"images folder (give it as --images): {folder}" in result.output
    assert "4 images" in result.output
    check = runner.invoke(app, ["data", "check", "--coco", str(out), "--images", str(folder)])
    assert check.exit_code == 0, check.output


def test_to_coco_refuses_invalid_data_unless_skipped(formats, tmp_path):
    xml = formats.voc / "Annotations/a.xml"
    xml.write_text(xml.read_text().replace("<name>cat</name>", "<name>zebra</name>"))
    out = tmp_path / "ann.json"
    args = ["data", "to-coco", "--voc", str(formats.voc), "--split", "train", "--classes", "cat,dog,bird"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert _errors(result.output) == [
        f"error: {xml}: object 1 (zebra): unknown class 'zebra' (classes: cat, dog, bird)"
    ]
    result = runner.invoke(app, [*args, "--out", str(out), "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "5 annotations" in result.output
    # to-coco takes no COCO input
    result = runner.invoke(app, ["data", "to-coco", "--coco", str(out), "--out", str(out)])
    assert result.exit_code == 2


def test_to_parquet_takes_yolo_and_voc(formats, tmp_path):
    result = runner.invoke(
        app, ["data", "to-parquet", "--yolo", str(formats.yolo), "--split", "train", "--out", str(tmp_path / "shards")]
    )
    assert result.exit_code == 0, result.output
    shards = open_source(parquet=tmp_path / "shards")
    assert shards.records == open_source(yolo=formats.yolo, split="train").records
    result = runner.invoke(app, ["data", "to-parquet", "--voc", str(formats.voc), "--out", str(tmp_path / "v")])
    assert result.exit_code == 2 and "--voc needs --split" in result.output
