"""Parquet shards: lossless round trip, lazy reads in DataLoader workers, clear errors."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from detkd.data import open_source
from detkd.data.coco import load_coco
from detkd.data.dataset import DetectionDataset, collate_detection
from detkd.data.parquet import CATEGORIES_KEY, load_parquet, write_parquet
from detkd.data.records import DatasetError


@pytest.fixture
def coco_source(coco_set):
    return load_coco(coco_set.ann_path, coco_set.images_dir)


def test_round_trip_preserves_records_categories_and_bytes(coco_source, coco_set, tmp_path) -> None:
    paths = write_parquet(coco_source, tmp_path / "shards", shard_size=2, row_group_size=1)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not list((tmp_path / "shards").glob(".*"))  # no temporary files left

    loaded = load_parquet(tmp_path / "shards")

    assert loaded.categories == coco_source.categories
    assert loaded.records == coco_source.records
    assert [r.boxes.dtype for r in loaded.records] == ["float32"] * 5
    for record in loaded.records:
        assert loaded.image_reader(record) == (coco_set.images_dir / record.file_name).read_bytes()
    assert loaded.label_of(90) == 3
    assert loaded.to_coco_dict()["annotations"] == coco_source.to_coco_dict()["annotations"]


def test_schema_and_single_shard_file(coco_source, tmp_path) -> None:
    (path,) = write_parquet(coco_source, tmp_path / "one")
    schema = pq.read_schema(path)
    assert schema.field("image_id").type == pa.int64()
    assert schema.field("width").type == pa.int32()
    assert schema.field("image").type == pa.binary()
    assert schema.field("boxes").type == pa.list_(pa.list_(pa.float32()))
    assert schema.field("iscrowd").type == pa.list_(pa.bool_())
    assert json.loads(schema.metadata[CATEGORIES_KEY]) == [
        {"id": 7, "name": "dog"},
        {"id": 3, "name": "cat"},
        {"id": 90, "name": "bird"},
    ]
    loaded = load_parquet(path)  # a shard file works as well as a folder
    assert [r.image_id for r in loaded.records] == [1, 2, 3, 4, 5]
    assert open_source(parquet=path).records == loaded.records


def test_rewrite_removes_stale_shards(coco_source, tmp_path) -> None:
    write_parquet(coco_source, tmp_path / "s", shard_size=1)
    assert len(list((tmp_path / "s").glob("*.parquet"))) == 5
    write_parquet(coco_source, tmp_path / "s", shard_size=10)
    assert [p.name for p in (tmp_path / "s").glob("*.parquet")] == ["part-00000.parquet"]
    assert len(load_parquet(tmp_path / "s").records) == 5


def test_empty_source_keeps_categories(coco_source, tmp_path) -> None:
    coco_source.records = []
    write_parquet(coco_source, tmp_path / "empty")
    loaded = load_parquet(tmp_path / "empty")
    assert loaded.records == [] and loaded.num_classes == 3


def test_reader_survives_pickling_and_reads_lazily(coco_source, tmp_path) -> None:
    write_parquet(coco_source, tmp_path / "s", shard_size=3, row_group_size=2)
    loaded = load_parquet(tmp_path / "s")
    first = loaded.image_reader(loaded.records[0])
    clone = pickle.loads(pickle.dumps(loaded))
    assert clone.records == loaded.records
    assert [clone.image_reader(r) for r in reversed(clone.records)] == [
        loaded.image_reader(r) for r in reversed(loaded.records)
    ]
    assert clone.image_reader(clone.records[0]) == first


def test_dataloader_with_two_workers(coco_source, tmp_path) -> None:
    write_parquet(coco_source, tmp_path / "s", shard_size=2, row_group_size=1)
    from_parquet = DetectionDataset(load_parquet(tmp_path / "s"), train=False)
    from_coco = DetectionDataset(coco_source, train=False)

    loader = DataLoader(from_parquet, batch_size=2, num_workers=2, collate_fn=collate_detection)
    seen = {}
    for images, targets in loader:
        for image, target in zip(images, targets, strict=True):
            seen[target["image_id"]] = (image, target)

    assert sorted(seen) == [1, 2, 3, 4, 5]
    for index in range(len(from_coco)):
        image, target = from_coco[index]
        other_image, other_target = seen[target["image_id"]]
        assert torch.equal(image, other_image)
        assert torch.equal(target["boxes"], other_target["boxes"])
        assert torch.equal(target["labels"], other_target["labels"])


def test_folder_without_shards_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError) as info:
        load_parquet(tmp_path / "nothing")
    (problem,) = info.value.problems
    assert problem.file == str(tmp_path / "nothing")
    assert "no *.parquet files found" in problem.message

    with pytest.raises(DatasetError, match="not found"):
        load_parquet(tmp_path / "missing")


def _table_from(source_path) -> pa.Table:
    return pq.read_table(source_path)


def test_missing_categories_metadata_names_the_file(coco_source, tmp_path) -> None:
    (path,) = write_parquet(coco_source, tmp_path / "s")
    bad = tmp_path / "bad" / "part-00000.parquet"
    bad.parent.mkdir()
    pq.write_table(_table_from(path).replace_schema_metadata(None), bad)

    with pytest.raises(DatasetError) as info:
        load_parquet(bad.parent)
    (problem,) = info.value.problems
    assert problem.file == str(bad)
    assert "detkd.categories" in problem.message


def test_invalid_categories_metadata(coco_source, tmp_path) -> None:
    (path,) = write_parquet(coco_source, tmp_path / "s")
    bad = tmp_path / "bad.parquet"
    pq.write_table(_table_from(path).replace_schema_metadata({CATEGORIES_KEY: b'[{"id": "x"}]'}), bad)
    with pytest.raises(DatasetError) as info:
        load_parquet(bad)
    assert info.value.problems[0].file == str(bad)
    assert "invalid 'detkd.categories' metadata" in info.value.problems[0].message


def test_missing_columns_names_the_file(coco_source, tmp_path) -> None:
    (path,) = write_parquet(coco_source, tmp_path / "s")
    bad = tmp_path / "bad.parquet"
    pq.write_table(_table_from(path).drop_columns(["boxes", "iscrowd"]), bad)
    with pytest.raises(DatasetError) as info:
        load_parquet(bad)
    (problem,) = info.value.problems
    assert problem.file == str(bad)
    assert "missing column(s) ['boxes', 'iscrowd']" in problem.message


def test_not_a_parquet_file(tmp_path) -> None:
    bad = tmp_path / "part-00000.parquet"
    bad.write_bytes(b"hello")
    with pytest.raises(DatasetError) as info:
        load_parquet(tmp_path)
    assert info.value.problems[0].file == str(bad)
