"""Read, validate and write YOLO detection datasets in the layout Ultralytics uses.

A ``data.yaml`` names the dataset root (``path``), each split (``train``, ``val``,
``test``: a folder searched recursively for images, a text file listing image
paths, or a list of those) and the class ``names`` (a list, or a mapping
``id: name``; ``nc`` is optional and must agree). The labels of
``.../images/.../x.jpg`` are in ``.../labels/.../x.txt`` (the last ``images``
folder of the path becomes ``labels``, as Ultralytics' ``img2label_paths``): one
``class cx cy w h`` line per object, normalised to [0, 1]; a line with more
values is a polygon ``class x1 y1 x2 y2 ...`` and becomes its bounding box, as
in Ultralytics. An image without a label file has no objects.

Where detkd differs from Ultralytics, it is to depend on nothing but the files:
a relative ``path`` is relative to the yaml's folder (Ultralytics tries the
working directory, then its own datasets folder), and a relative line of a list
file is relative to the list's folder (Ultralytics: only lines starting ``./``).
A split entry ``../x`` that does not exist is tried as ``x``, as Ultralytics does
(Roboflow exports write ``train: ../train/images`` next to ``train/``).

Category ids are the YOLO class indices, 0-based (COCO evaluation accepts 0).
Image ids are 1..N in sorted path order over every image the split names, so a
dropped image leaves a gap instead of renumbering the others. Sizes come from
the image header; images with an EXIF rotation are refused
(:mod:`detkd.data.image_files`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detkd.data.coco import FileImageReader
from detkd.data.image_files import IMG_FORMATS, ImageFileError, image_size, is_image_file
from detkd.data.records import Category, DetectionSource, ImageRecord, Problem, image_record_name
from detkd.data.summary import accept_or_raise, empty_summary, summarize

__all__ = ["YOLO_SPLITS", "label_path", "load_yolo", "validate_yolo", "write_yolo"]

YOLO_SPLITS = ("train", "val", "test")
COORD_EPS = 1e-6  # normalised values within [-1e-6, 1 + 1e-6] pass (text rounding), then boxes are clipped
MIN_BOX_PX = 1e-3  # a box narrower or lower than this, in pixels, is zero-size


def label_path(image: Path) -> Path:
    """The label file of an image: the last ``images`` folder becomes ``labels``, the suffix ``.txt``."""
    text = str(image)
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(labels.join(text.rsplit(images, 1)).rsplit(".", 1)[0] + ".txt")


# --------------------------------------------------------------------------- data.yaml


@dataclass(frozen=True)
class _Listed:
    """An image path and where the split named it (the file and line, or the yaml key)."""

    path: Path
    file: str
    record: str


def _read_yaml(data_yaml: Path, file: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    try:
        text = data_yaml.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [Problem(file, "-", "data.yaml not found")]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(file, "-", f"cannot read data.yaml: {exc}")]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return None, [Problem(file, "-", f"malformed YAML{where}: {getattr(exc, 'problem', None) or exc}")]
    if not isinstance(data, dict):
        return None, [Problem(file, "-", f"top level must be a mapping, got {type(data).__name__}")]
    return data, []


def _class_names(data: dict[str, Any], file: str, problems: list[Problem]) -> list[str] | None:
    """``names`` as a list indexed by class id (Ultralytics' check_class_names rules)."""
    nc = data.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 0):
        problems.append(Problem(file, "key 'nc'", f"must be a non-negative integer, got {nc!r}"))
        return None
    raw = data.get("names")
    if raw is None:
        if nc is None:
            why = "missing: give the class names (a list, or a mapping id: name)"
            problems.append(Problem(file, "key 'names'", why))
            return None
        return [f"class_{i}" for i in range(nc)]  # what Ultralytics names them
    if isinstance(raw, list):
        pairs = list(enumerate(raw))
    elif isinstance(raw, dict):
        pairs = []
        for key, value in raw.items():
            if isinstance(key, bool) or not isinstance(key, int | str) or not str(key).isdigit():
                problems.append(Problem(file, "key 'names'", f"class ids must be integers, got {key!r}"))
                return None
            pairs.append((int(key), value))
        pairs.sort()
        ids = [i for i, _ in pairs]
        if ids != list(range(len(ids))):
            why = f"class ids must be 0..{len(ids) - 1} without gaps, got {ids}"
            problems.append(Problem(file, "key 'names'", why))
            return None
    else:
        problems.append(Problem(file, "key 'names'", f"must be a list or a mapping id: name, got {type(raw).__name__}"))
        return None
    names = []
    for i, value in pairs:
        if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value) == "":
            problems.append(Problem(file, "key 'names'", f"class {i}: name must be a non-empty string, got {value!r}"))
            return None
        names.append(str(value))
    if nc is not None and nc != len(names):
        problems.append(Problem(file, "key 'nc'", f"nc is {nc} but 'names' has {len(names)} classes"))
        return None
    return names


def _dataset_root(data: dict[str, Any], data_yaml: Path, file: str, problems: list[Problem]) -> Path | None:
    raw = data.get("path")
    if raw in (None, ""):
        root = data_yaml.parent
    elif not isinstance(raw, str):
        problems.append(Problem(file, "key 'path'", f"must be a folder path, got {raw!r}"))
        return None
    else:
        root = Path(raw).expanduser()
        root = root if root.is_absolute() else data_yaml.parent / root
    if not root.is_dir():
        problems.append(Problem(file, "key 'path'", f"dataset folder {root} not found"))
        return None
    return Path(os.path.abspath(root))


def _split_entries(data: dict[str, Any], split: str, file: str, problems: list[Problem]) -> list[str] | None:
    raw = data.get(split)
    if raw is None or raw == []:
        problems.append(Problem(file, f"key '{split}'", f"missing: this data.yaml has no {split} split"))
        return None
    entries = [raw] if isinstance(raw, str) else raw
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        problems.append(
            Problem(file, f"key '{split}'", f"must be a folder or list file, or a list of those, got {raw!r}")
        )
        return None
    return entries


def _list_file(path: Path, problems: list[Problem]) -> tuple[list[_Listed], list[Path]] | None:
    """The images a list file names, one per line; None when the file cannot be read or is empty."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(path), "-", f"cannot read image list: {exc}"))
        return None
    listed, anchors = [], []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        image = Path(text).expanduser()
        image = Path(os.path.abspath(image if image.is_absolute() else path.parent / image))
        if not is_image_file(image):
            suffixes = ", ".join(sorted(IMG_FORMATS))
            problems.append(Problem(str(path), f"line {number}", f"{text!r} is not an image file ({suffixes})"))
            continue
        listed.append(_Listed(image, str(path), f"line {number}"))
        anchors.append(image.parent)
    if not any(line.strip() for line in lines):
        problems.append(Problem(str(path), "-", "no images listed"))
        return None
    return listed, anchors


def _split_images(
    entries: list[str], root: Path, split: str, file: str, problems: list[Problem]
) -> tuple[list[_Listed], list[Path]] | None:
    """Every image the split names (duplicates kept) and the folders its common root is taken over.

    None when an entry is missing, unreadable or an empty folder: the split itself is broken.
    """
    key = f"key '{split}'"
    listed: list[_Listed] = []
    anchors: list[Path] = []
    broken = False
    for entry in entries:
        path = Path(entry).expanduser()
        path = Path(os.path.abspath(path if path.is_absolute() else root / path))
        if not path.exists() and entry.startswith("../"):  # as Ultralytics: Roboflow exports write ../train/images
            path = Path(os.path.abspath(root / entry[3:]))
        if path.is_dir():
            # as Ultralytics: recursive, hidden files skipped, suffix case ignored
            found = sorted(
                Path(p) for p in glob.glob(os.path.join(glob.escape(str(path)), "**", "*.*"), recursive=True)
            )
            found = [p for p in found if is_image_file(p) and p.is_file()]
            if not found:
                problems.append(Problem(file, key, f"no images found in {path}"))
                broken = True
            listed += [_Listed(p, file, key) for p in found]
            anchors.append(path)
        elif path.is_file():
            got = _list_file(path, problems)
            if got is None:
                broken = True
                continue
            listed += got[0]
            anchors += got[1]
        else:
            problems.append(Problem(file, key, f"{path} not found"))
            broken = True
    return None if broken else (listed, anchors)


# --------------------------------------------------------------------------- labels


def _parse_line(
    tokens: list[str], *, width: int, height: int, num_classes: int
) -> tuple[tuple[float, float, float, float], int] | str:
    """A label line as an absolute xyxy box and its class, or why it is invalid."""
    n = len(tokens)
    if n != 5 and (n < 7 or n % 2 == 0):
        return f"malformed line: expected 'class cx cy w h' (5 numbers) or a polygon 'class x1 y1 x2 y2 ...', got {n}"
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        return f"malformed line: not numbers: {' '.join(tokens)!r}"
    if not all(np.isfinite(values)):
        return f"malformed line: not finite: {' '.join(tokens)!r}"
    if not values[0].is_integer():
        return f"malformed line: class must be an integer, got {tokens[0]!r}"
    cls = int(values[0])
    if not 0 <= cls < num_classes:
        return f"class id {cls} is not in names (0..{num_classes - 1})"
    coords = values[1:]
    if min(coords) < -COORD_EPS or max(coords) > 1 + COORD_EPS:
        return f"coordinates must be normalised to [0, 1], got {' '.join(tokens[1:])}"
    if n == 5:
        cx, cy, w, h = coords
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    else:
        xs, ys = coords[0::2], coords[1::2]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    box = (
        min(max(x1, 0.0), 1.0) * width,
        min(max(y1, 0.0), 1.0) * height,
        min(max(x2, 0.0), 1.0) * width,
        min(max(y2, 0.0), 1.0) * height,
    )
    if box[2] - box[0] < MIN_BOX_PX or box[3] - box[1] < MIN_BOX_PX:
        return f"zero-size box ({box[2] - box[0]:.3g} x {box[3] - box[1]:.3g} px in a {width}x{height} image)"
    return box, cls


def _read_labels(
    path: Path, *, width: int, height: int, num_classes: int, problems: list[Problem]
) -> tuple[list[tuple[tuple[float, float, float, float], int]], int] | None:
    """Valid boxes of a label file and its number of label lines; None when it cannot be read."""
    if not path.is_file():
        return [], 0  # no label file: an image without objects
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(path), "-", f"cannot read label file: {exc}"))
        return None
    boxes, total = [], 0
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        total += 1
        parsed = _parse_line(tokens, width=width, height=height, num_classes=num_classes)
        if isinstance(parsed, str):
            problems.append(Problem(str(path), f"line {number}", parsed))
        else:
            boxes.append(parsed)
    return boxes, total


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        return 0


# --------------------------------------------------------------------------- public API


def validate_yolo(
    data_yaml: Path, split: str, *, verify_images: bool = True
) -> tuple[DetectionSource | None, list[Problem], dict[str, Any]]:
    """Check one split of a YOLO dataset; build a source from the valid records.

    Returns ``(source, problems, summary)`` like :func:`detkd.data.coco.validate_coco`.
    ``source`` is None when the data.yaml or the split's definition is unusable. A bad
    label line drops only itself; a missing or unreadable image drops with its labels.
    Image headers are always read (YOLO labels carry no size); ``verify_images`` also
    decodes every image.
    """
    data_yaml = Path(data_yaml)
    file = str(data_yaml)
    if split not in YOLO_SPLITS:
        why = f"split must be one of {', '.join(YOLO_SPLITS)}, got {split!r}"
        return None, [Problem(file, "-", why)], empty_summary()
    data, problems = _read_yaml(data_yaml, file)
    if data is None:
        return None, problems, empty_summary()
    names = _class_names(data, file, problems)
    root = _dataset_root(data, data_yaml, file, problems)
    entries = _split_entries(data, split, file, problems)
    if names is None or root is None or entries is None:
        return None, problems, empty_summary()
    found = _split_images(entries, root, split, file, problems)
    if found is None:
        return None, problems, empty_summary()
    listed, anchors = found

    first: dict[Path, _Listed] = {}
    for item in listed:
        if item.path in first:
            seen = first[item.path]
            problems.append(
                Problem(item.file, item.record, f"image {item.path} is listed twice (first: {seen.file} {seen.record})")
            )
            continue
        first[item.path] = item
    images_root = Path(os.path.commonpath([str(a) for a in anchors])) if anchors else root

    records: list[ImageRecord] = []
    annotations_total = 0
    next_ann_id = 1
    for image_id, path in enumerate(sorted(first, key=str), start=1):
        item = first[path]
        file_name = path.relative_to(images_root).as_posix()
        labels = label_path(path)
        if not path.is_file():
            problems.append(Problem(item.file, item.record, f"image {path} not found"))
            annotations_total += _count_lines(labels)
            continue
        try:
            width, height = image_size(path, decode=verify_images)
        except ImageFileError as exc:
            problems.append(Problem(str(path), image_record_name(image_id, file_name), str(exc)))
            annotations_total += _count_lines(labels)
            continue
        read = _read_labels(labels, width=width, height=height, num_classes=len(names), problems=problems)
        if read is None:
            continue
        boxes, total = read
        annotations_total += total
        records.append(
            ImageRecord(
                image_id=image_id,
                file_name=file_name,
                width=width,
                height=height,
                boxes=np.array([b for b, _ in boxes], dtype=np.float32).reshape(-1, 4),
                category_ids=np.array([c for _, c in boxes], dtype=np.int64),
                iscrowd=np.zeros(len(boxes), dtype=bool),
                annotation_ids=np.arange(next_ann_id, next_ann_id + len(boxes), dtype=np.int64),
            )
        )
        next_ann_id += len(boxes)

    categories = [Category(id=i, name=name) for i, name in enumerate(names)]
    source = DetectionSource(
        categories=categories, records=records, image_reader=FileImageReader(images_root), origin=f"{file}#{split}"
    )
    summary = summarize(records, categories, images_total=len(first), annotations_total=annotations_total)
    return source, problems, summary


def load_yolo(
    data_yaml: Path, split: str, *, skip_invalid: bool = False, verify_images: bool = False
) -> DetectionSource:
    """Load one split of a YOLO dataset, refusing bad data unless asked to skip it (as :func:`load_coco`).

    The source's image reader reads from the split's images folder (its ``root``): the
    folder the split names, or the common parent of the folders and listed images.
    """
    source, problems, summary = validate_yolo(data_yaml, split, verify_images=verify_images)
    return accept_or_raise(source, problems, summary, skip_invalid=skip_invalid, origin=f"{data_yaml}#{split}")


def _check_file_name(name: str) -> Path:
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not name:
        raise ValueError(f"file_name {name!r} must be a relative path inside the images folder")
    return path


def write_yolo(root: Path, splits: Mapping[str, DetectionSource]) -> Path:
    """Write sources as a YOLO dataset under ``root`` and return its ``data.yaml``.

    ``root/images/<split>/<file_name>`` holds the image bytes as read (never re-encoded),
    ``root/labels/<split>/...txt`` the boxes, clipped to the image and normalised. Class k
    is the k-th category in label order (every split must have the same categories).
    Crowd regions have no YOLO form and are left out; images without objects get no
    label file. The yaml has no ``path``, so both detkd and Ultralytics read it relative to itself.
    """
    root = Path(root)
    if not splits:
        raise ValueError("write_yolo: no splits given")
    unknown = [s for s in splits if s not in YOLO_SPLITS]
    if unknown:
        raise ValueError(f"write_yolo: splits must be among {YOLO_SPLITS}, got {unknown}")
    ordered = [source.sorted_categories for source in splits.values()]
    if any(cats != ordered[0] for cats in ordered):
        raise ValueError("write_yolo: every split must have the same categories")
    index = {c.id: k for k, c in enumerate(ordered[0])}
    for split, source in splits.items():
        for rec in source.records:
            image = root / "images" / split / _check_file_name(rec.file_name)
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(source.image_reader(rec))
            lines = []
            for (x1, y1, x2, y2), cat, crowd in zip(
                rec.boxes.tolist(), rec.category_ids.tolist(), rec.iscrowd.tolist(), strict=True
            ):
                if crowd:
                    continue
                x1, x2 = (min(max(v, 0.0), rec.width) / rec.width for v in (x1, x2))
                y1, y2 = (min(max(v, 0.0), rec.height) / rec.height for v in (y1, y2))
                cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
                lines.append(f"{index[cat]} {cx:.8g} {cy:.8g} {w:.8g} {h:.8g}")
            if lines:
                labels = label_path(image)
                labels.parent.mkdir(parents=True, exist_ok=True)
                labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = {split: f"images/{split}" for split in splits}
    data.update(nc=len(ordered[0]), names={k: c.name for k, c in enumerate(ordered[0])})
    data_yaml = root / "data.yaml"
    tmp = root / f".data.yaml.tmp{os.getpid()}"
    try:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        os.replace(tmp, data_yaml)
    finally:
        tmp.unlink(missing_ok=True)
    return data_yaml
