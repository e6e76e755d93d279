"""Parquet shards: a dataset as a few large files with images embedded.

Many small image files are slow on network and object storage; shards of a
few hundred images each move and cache well (Ray Data, s3). The image bytes
are stored as read (never re-encoded), so a COCO -> Parquet conversion is
lossless. Readers load the small metadata columns eagerly and the image column
lazily, one row group at a time.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detkd.data.records import (
    Category,
    DatasetError,
    DetectionSource,
    ImageRecord,
    Problem,
    image_record_name,
)

__all__ = ["CATEGORIES_KEY", "SCHEMA", "ParquetImageReader", "load_parquet", "write_parquet"]

CATEGORIES_KEY = b"detkd.categories"
ORIGIN_KEY = b"detkd.origin"
SHARD_PATTERN = "part-{:05d}.parquet"

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64()),
        pa.field("file_name", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image", pa.binary()),
        pa.field("boxes", pa.list_(pa.list_(pa.float32()))),
        pa.field("category_ids", pa.list_(pa.int64())),
        pa.field("iscrowd", pa.list_(pa.bool_())),
        pa.field("annotation_ids", pa.list_(pa.int64())),
    ]
)
METADATA_COLUMNS = [name for name in SCHEMA.names if name != "image"]


# --------------------------------------------------------------------------- writing


def _shard_table(source: DetectionSource, records: list[ImageRecord], metadata: dict[bytes, bytes]) -> pa.Table:
    columns: dict[str, list[Any]] = {
        "image_id": [int(r.image_id) for r in records],
        "file_name": [r.file_name for r in records],
        "width": [int(r.width) for r in records],
        "height": [int(r.height) for r in records],
        "image": [bytes(source.image_reader(r)) for r in records],
        "boxes": [r.boxes.tolist() for r in records],
        "category_ids": [r.category_ids.tolist() for r in records],
        "iscrowd": [r.iscrowd.tolist() for r in records],
        "annotation_ids": [r.annotation_ids.tolist() for r in records],
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA.with_metadata(metadata))


def write_parquet(
    source: DetectionSource,
    out_dir: Path,
    *,
    shard_size: int = 512,
    row_group_size: int = 64,
) -> list[Path]:
    """Write ``source`` as ``out_dir/part-00000.parquet``, ... and return the shard paths.

    Each shard is written to a temporary name and renamed. Shards named
    ``part-*.parquet`` left in ``out_dir`` by an earlier, larger write are
    removed so that reading the folder gives exactly this source. An empty
    source still writes one (empty) shard to carry the categories.
    ``row_group_size`` is the unit of lazy image reads.
    """
    if shard_size < 1 or row_group_size < 1:
        raise ValueError(f"shard_size and row_group_size must be >= 1, got {shard_size}, {row_group_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {
        CATEGORIES_KEY: json.dumps([{"id": c.id, "name": c.name} for c in source.categories]).encode(),
        ORIGIN_KEY: source.origin.encode(),
    }
    records = source.records
    starts = range(0, max(len(records), 1), shard_size)
    paths: list[Path] = []
    for shard, start in enumerate(starts):
        table = _shard_table(source, records[start : start + shard_size], metadata)
        path = out_dir / SHARD_PATTERN.format(shard)
        tmp = out_dir / f".{path.name}.tmp{os.getpid()}"
        try:
            pq.write_table(table, tmp, row_group_size=row_group_size)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
    written = set(paths)
    for stale in out_dir.glob("part-*.parquet"):
        if stale not in written:
            stale.unlink()
    return paths


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Location:
    file: int
    row_group: int
    row: int


class ParquetImageReader:
    """Reads one record's image bytes from its shard, a row group at a time.

    Keeps the last row group read (per process), so sequential access reads
    each row group once. Picklable: caches and file handles are not carried
    into DataLoader workers and are rebuilt there on first use.
    """

    def __init__(self, files: list[str], locations: dict[int, _Location]) -> None:
        self.files = files
        self.locations = locations
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cached_key: tuple[int, int] | None = None
        self._cached_images: list[bytes] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self.files, "locations": self.locations}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.files = state["files"]
        self.locations = state["locations"]
        self._reset()

    def __call__(self, record: ImageRecord) -> bytes:
        if os.getpid() != self._pid:  # forked worker: don't share handles with the parent
            self._reset()
        try:
            loc = self.locations[int(record.image_id)]
        except KeyError:
            raise DatasetError(
                [
                    Problem(
                        self.files[0] if self.files else "-",
                        image_record_name(record.image_id, record.file_name),
                        "image id not found in the parquet shards",
                    )
                ]
            ) from None
        key = (loc.file, loc.row_group)
        with self._lock:
            if key != self._cached_key:
                self._cached_images = self._read_row_group(loc.file, loc.row_group)
                self._cached_key = key
            return self._cached_images[loc.row]

    def _read_row_group(self, file: int, row_group: int) -> list[bytes]:
        path = self.files[file]
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = pq.ParquetFile(path)
            column = handle.read_row_group(row_group, columns=["image"]).column("image")
            return column.to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError([Problem(path, f"row group {row_group}", f"cannot read images: {exc}")]) from None


def _shard_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if p.is_file())
        if not files:
            raise DatasetError([Problem(str(path), "-", "no *.parquet files found in this folder")])
        return files
    if path.is_file():
        return [path]
    raise DatasetError([Problem(str(path), "-", "parquet file or folder not found")])


def _categories_from_metadata(file: str, metadata: dict[bytes, bytes] | None) -> list[Category]:
    raw = (metadata or {}).get(CATEGORIES_KEY)
    if raw is None:
        raise DatasetError(
            [
                Problem(
                    file,
                    "-",
                    f"missing schema metadata key {CATEGORIES_KEY.decode()!r} "
                    "(was this written by detkd write_parquet?)",
                )
            ]
        )

    def invalid(why: str) -> DatasetError:
        return DatasetError(
            [
                Problem(
                    file,
                    "-",
                    f"invalid {CATEGORIES_KEY.decode()!r} metadata (expected a JSON list of {{id, name}}): {why}",
                )
            ]
        )

    try:
        items = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"not JSON: {exc}") from None
    if not isinstance(items, list) or not all(
        isinstance(item, dict)
        and isinstance(item.get("id"), int)
        and not isinstance(item.get("id"), bool)
        and isinstance(item.get("name"), str)
        for item in items
    ):
        raise invalid("each entry needs an integer 'id' and a string 'name'")
    categories = [Category(id=item["id"], name=item["name"]) for item in items]
    if len({c.id for c in categories}) != len(categories):
        raise invalid("duplicate category ids")
    return categories


def _split_lists(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Row offsets (len rows + 1, starting at 0) and the flattened child values of a list column."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = np.asarray(array.offsets.to_numpy(), dtype=np.int64)
    values = array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    return offsets - offsets[0], values


def _records_from_table(table: pa.Table, file: str) -> list[ImageRecord]:
    for name in METADATA_COLUMNS:
        if table.column(name).null_count:
            raise DatasetError([Problem(file, "-", f"column {name!r} contains nulls")])
    ids = table.column("image_id").to_numpy()
    names = table.column("file_name").to_pylist()
    widths = table.column("width").to_numpy()
    heights = table.column("height").to_numpy()

    box_offsets, box_lists = _split_lists(table.column("boxes"))
    if box_lists.null_count or (len(box_lists) and np.any(box_lists.value_lengths().to_numpy() != 4)):
        raise DatasetError([Problem(file, "-", "column 'boxes' must hold lists of 4 numbers per box")])
    flat = box_lists.flatten().to_numpy(zero_copy_only=False)
    boxes = np.asarray(flat, dtype=np.float32).reshape(-1, 4)

    parts: dict[str, np.ndarray] = {}
    for name in ("category_ids", "iscrowd", "annotation_ids"):
        offsets, values = _split_lists(table.column(name))
        if values.null_count or not np.array_equal(offsets, box_offsets):
            raise DatasetError([Problem(file, "-", f"column {name!r} does not match 'boxes' (one value per box)")])
        parts[name] = values.to_numpy(zero_copy_only=False)

    records = []
    for i in range(table.num_rows):
        a, b = box_offsets[i], box_offsets[i + 1]
        records.append(
            ImageRecord(
                image_id=int(ids[i]),
                file_name=names[i],
                width=int(widths[i]),
                height=int(heights[i]),
                boxes=boxes[a:b],
                category_ids=parts["category_ids"][a:b],
                iscrowd=parts["iscrowd"][a:b],
                annotation_ids=parts["annotation_ids"][a:b],
            )
        )
    return records


def load_parquet(path: Path) -> DetectionSource:
    """Open a shard file or a folder of ``*.parquet`` shards as a source.

    Metadata columns are read now; image bytes are read on demand. Raises
    :class:`DatasetError` naming the file for anything that is not a detkd
    dataset (no shards, missing columns, missing or invalid categories,
    shards that disagree on categories, duplicate image ids).
    """
    path = Path(path)
    files = _shard_files(path)
    categories: list[Category] | None = None
    records: list[ImageRecord] = []
    locations: dict[int, _Location] = {}
    for file_index, file_path in enumerate(files):
        file = str(file_path)
        try:
            handle = pq.ParquetFile(file_path)
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError([Problem(file, "-", f"not a readable parquet file: {exc}")]) from None
        schema = handle.schema_arrow
        missing = [name for name in SCHEMA.names if name not in schema.names]
        if missing:
            raise DatasetError([Problem(file, "-", f"missing column(s) {missing}")])
        shard_categories = _categories_from_metadata(file, schema.metadata)
        if categories is None:
            categories = shard_categories
        elif shard_categories != categories:
            raise DatasetError([Problem(file, "-", f"categories differ from those of {files[0]}")])
        try:
            table = handle.read(columns=METADATA_COLUMNS).cast(
                pa.schema([SCHEMA.field(name) for name in METADATA_COLUMNS])
            )
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise DatasetError([Problem(file, "-", f"cannot read metadata columns: {exc}")]) from None
        shard_records = _records_from_table(table, file)

        row_group, row, left = 0, 0, handle.metadata.row_group(0).num_rows if handle.num_row_groups else 0
        for record in shard_records:
            while left == 0:
                row_group, row = row_group + 1, 0
                left = handle.metadata.row_group(row_group).num_rows
            if record.image_id in locations:
                raise DatasetError(
                    [
                        Problem(
                            file,
                            image_record_name(record.image_id, record.file_name),
                            "duplicate image id across rows/shards",
                        )
                    ]
                )
            locations[record.image_id] = _Location(file_index, row_group, row)
            row, left = row + 1, left - 1
        records.extend(shard_records)

    assert categories is not None  # at least one file was read
    return DetectionSource(
        categories=categories,
        records=records,
        image_reader=ParquetImageReader([str(f) for f in files], locations),
        origin=str(path),
    )
