"""Read, validate and write Pascal VOC detection datasets.

Layout: ``ROOT/ImageSets/Main/<split>.txt`` lists image ids, one per line;
``ROOT/Annotations/<id>.xml`` holds each image's size and objects;
``ROOT/JPEGImages/<filename>`` the image (the XML's ``<filename>``, else ``<id>.jpg``).

Boxes: VOC's ``xmin ymin xmax ymax`` are 1-based, inclusive pixel indices (a box
covering a W x H image is ``1 1 W H``). detkd's boxes are continuous 0-based xyxy,
so ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` (Detectron2's rule);
``xmin == xmax`` is a one-pixel-wide box, ``xmin > xmax`` an empty one.

``difficult`` objects become crowd regions (``iscrowd``): COCO evaluation ignores
detections that match them, as VOC's own evaluation does, and training never sees them.

Classes are the 20 VOC classes unless a list is given; an object of another class is
an error. Category id = the class's index in that list (0-based). Image ids are
1..N in split-file order.

The XML is parsed with :mod:`xml.etree.ElementTree`, which is not hardened against
hostile XML (entity expansion): datasets are trusted local files.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers.expat import ErrorString

import numpy as np

from detkd.data.coco import BOX_TOLERANCE_PX, FileImageReader
from detkd.data.image_files import ImageFileError, image_size
from detkd.data.records import Category, DetectionSource, ImageRecord, Problem, image_record_name
from detkd.data.summary import accept_or_raise, empty_summary, summarize

__all__ = ["VOC_CLASSES", "load_voc", "validate_voc", "write_voc"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


@dataclass
class _Annotation:
    """One XML file's image and its valid objects (xyxy, category id, difficult)."""

    file_name: str
    width: int
    height: int
    objects: list[tuple[tuple[float, float, float, float], int, bool]] = field(default_factory=list)


def _positive_int(text: str | None) -> int | None:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return int(value) if value.is_integer() and value > 0 else None


def _read_split(split_file: Path, problems: list[Problem]) -> list[tuple[int, str]] | None:
    """``(line, id)`` pairs of a split file, each id once; None when the file cannot be read."""
    try:
        lines = split_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        folder = split_file.parent
        known = sorted(p.stem for p in folder.glob("*.txt") if "_" not in p.stem) if folder.is_dir() else []
        problems.append(Problem(str(split_file), "-", f"split file not found (splits here: {known or 'none'})"))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(split_file), "-", f"cannot read split file: {exc}"))
        return None
    entries: list[tuple[int, str]] = []
    first: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 1:
            problems.append(Problem(str(split_file), f"line {number}", f"expected one image id, got {line.strip()!r}"))
            continue
        image = tokens[0]
        if image in first:
            problems.append(
                Problem(
                    str(split_file), f"line {number}", f"image id {image!r} listed twice (first: line {first[image]})"
                )
            )
            continue
        first[image] = number
        entries.append((number, image))
    return entries


def _parse_object(
    obj: ET.Element, index: int, *, width: int, height: int, class_ids: dict[str, int], file: str
) -> tuple[tuple[tuple[float, float, float, float], int, bool] | None, Problem | None]:
    name = (obj.findtext("name") or "").strip()
    record = f"object {index} ({name})" if name else f"object {index}"
    if not name:
        return None, Problem(file, record, "missing <name>")
    if name not in class_ids:
        return None, Problem(file, record, f"unknown class {name!r} (classes: {', '.join(class_ids)})")
    difficult_text = (obj.findtext("difficult") or "0").strip()
    if difficult_text not in ("0", "1"):
        return None, Problem(file, record, f"<difficult> must be 0 or 1, got {difficult_text!r}")
    bndbox = obj.find("bndbox")
    if bndbox is None:
        return None, Problem(file, record, "missing <bndbox>")
    raw = {key: bndbox.findtext(key) for key in ("xmin", "ymin", "xmax", "ymax")}
    try:
        xmin, ymin, xmax, ymax = (float((raw[k] or "").strip()) for k in ("xmin", "ymin", "xmax", "ymax"))
    except ValueError:
        return None, Problem(file, record, f"<bndbox> needs numbers xmin, ymin, xmax, ymax, got {raw}")
    if not all(np.isfinite((xmin, ymin, xmax, ymax))):
        return None, Problem(file, record, f"<bndbox> needs finite numbers, got {raw}")
    if xmin > xmax or ymin > ymax:
        sides = f"xmin {xmin:g} xmax {xmax:g} ymin {ymin:g} ymax {ymax:g}"
        return None, Problem(file, record, f"empty box: {sides} (1-based inclusive pixels: need min <= max)")
    box = (xmin - 1, ymin - 1, xmax, ymax)
    tol = BOX_TOLERANCE_PX
    if box[0] < -tol or box[1] < -tol or box[2] > width + tol or box[3] > height + tol:
        return None, Problem(
            file,
            record,
            f"box xmin {xmin:g} ymin {ymin:g} xmax {xmax:g} ymax {ymax:g} lies outside the {width}x{height} image",
        )
    return (box, class_ids[name], difficult_text == "1"), None


def _parse_annotation(
    xml_path: Path, voc_id: str, *, class_ids: dict[str, int], problems: list[Problem]
) -> tuple[_Annotation | None, int]:
    """The image and valid objects of one XML file, and its number of objects (0 when unusable)."""
    file = str(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        line, column = exc.position
        why = ErrorString(exc.code)
        problems.append(Problem(file, "-", f"malformed XML at line {line}, column {column + 1}: {why}"))
        return None, 0
    except OSError as exc:
        problems.append(Problem(file, "-", f"cannot read annotation file: {exc}"))
        return None, 0
    if root.tag != "annotation":
        problems.append(Problem(file, "-", f"root element must be <annotation>, got <{root.tag}>"))
        return None, 0
    objects = root.findall("object")
    size = root.find("size")
    if size is None:
        problems.append(Problem(file, "size", "missing <size>: the image's width and height are needed"))
        return None, len(objects)
    width, height = _positive_int(size.findtext("width")), _positive_int(size.findtext("height"))
    if width is None or height is None:
        got = f"width {size.findtext('width')!r}, height {size.findtext('height')!r}"
        problems.append(Problem(file, "size", f"<size> needs positive integer <width> and <height>, got {got}"))
        return None, len(objects)
    file_name = (root.findtext("filename") or "").strip() or f"{voc_id}.jpg"
    annotation = _Annotation(file_name=file_name, width=width, height=height)
    for index, obj in enumerate(objects, start=1):
        parsed, problem = _parse_object(obj, index, width=width, height=height, class_ids=class_ids, file=file)
        if problem is not None:
            problems.append(problem)
        else:
            annotation.objects.append(parsed)
    return annotation, len(objects)


def _check_classes(classes: Sequence[str] | None, file: str) -> tuple[list[str], list[Problem]]:
    names = list(VOC_CLASSES if classes is None else classes)
    if not names or not all(isinstance(n, str) and n.strip() == n and n for n in names):
        return names, [Problem(file, "classes", f"must be a non-empty list of class names, got {names}")]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        return names, [Problem(file, "classes", f"class names must be distinct, repeated: {duplicates}")]
    return names, []


# --------------------------------------------------------------------------- public API


def validate_voc(
    root: Path, split: str, *, classes: Sequence[str] | None = None, verify_images: bool = True
) -> tuple[DetectionSource | None, list[Problem], dict[str, Any]]:
    """Check one split of a Pascal VOC dataset; build a source from the valid records.

    Returns ``(source, problems, summary)`` like :func:`detkd.data.coco.validate_coco`;
    ``source`` is None when the folder, the split file or ``classes`` is unusable. A bad
    object drops only itself; an image whose XML or file is bad drops with its objects.
    Image headers are always read (size against the XML, EXIF orientation);
    ``verify_images`` also decodes every image.
    """
    root = Path(root)
    file = str(root)
    names, problems = _check_classes(classes, file)
    if problems:
        return None, problems, empty_summary()
    if not root.is_dir():
        return None, [Problem(file, "-", "VOC dataset folder not found")], empty_summary()
    entries = _read_split(root / "ImageSets" / "Main" / f"{split}.txt", problems)
    if entries is None:
        return None, problems, empty_summary()
    split_file = str(root / "ImageSets" / "Main" / f"{split}.txt")
    class_ids = {name: i for i, name in enumerate(names)}
    images_dir = root / "JPEGImages"

    records: list[ImageRecord] = []
    annotations_total = 0
    next_ann_id = 1
    for image_id, (line, voc_id) in enumerate(entries, start=1):
        xml_path = root / "Annotations" / f"{voc_id}.xml"
        if not xml_path.is_file():
            why = f"image id {voc_id!r} has no annotation file {xml_path}"
            problems.append(Problem(split_file, f"line {line}", why))
            continue
        annotation, total = _parse_annotation(xml_path, voc_id, class_ids=class_ids, problems=problems)
        annotations_total += total
        if annotation is None:
            continue
        path = images_dir / annotation.file_name
        name = image_record_name(image_id, annotation.file_name)
        if not path.is_file():
            problems.append(Problem(str(path), name, "image file not found"))
            continue
        try:
            size = image_size(path, decode=verify_images)
        except ImageFileError as exc:
            problems.append(Problem(str(path), name, str(exc)))
            continue
        if size != (annotation.width, annotation.height):
            problems.append(
                Problem(
                    str(path),
                    name,
                    f"real size {size[0]}x{size[1]} differs from <size> {annotation.width}x{annotation.height} "
                    f"in {xml_path.name}",
                )
            )
            continue
        n = len(annotation.objects)
        records.append(
            ImageRecord(
                image_id=image_id,
                file_name=annotation.file_name,
                width=annotation.width,
                height=annotation.height,
                boxes=np.array([o[0] for o in annotation.objects], dtype=np.float32).reshape(-1, 4),
                category_ids=np.array([o[1] for o in annotation.objects], dtype=np.int64),
                iscrowd=np.array([o[2] for o in annotation.objects], dtype=bool),
                annotation_ids=np.arange(next_ann_id, next_ann_id + n, dtype=np.int64),
            )
        )
        next_ann_id += n

    categories = [Category(id=i, name=name) for i, name in enumerate(names)]
    source = DetectionSource(
        categories=categories, records=records, image_reader=FileImageReader(images_dir), origin=f"{file}#{split}"
    )
    summary = summarize(records, categories, images_total=len(entries), annotations_total=annotations_total)
    return source, problems, summary


def load_voc(
    root: Path,
    split: str,
    *,
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
    verify_images: bool = False,
) -> DetectionSource:
    """Load one split of a VOC dataset, refusing bad data unless asked to skip it (as :func:`load_coco`)."""
    source, problems, summary = validate_voc(root, split, classes=classes, verify_images=verify_images)
    return accept_or_raise(source, problems, summary, skip_invalid=skip_invalid, origin=f"{root}#{split}")


def _number(value: float) -> str:
    return f"{value:.10g}"


def _annotation_xml(record: ImageRecord, file_name: str, names: dict[int, str]) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for key, value in (("width", record.width), ("height", record.height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for (x1, y1, x2, y2), cat, crowd in zip(
        record.boxes.tolist(), record.category_ids.tolist(), record.iscrowd.tolist(), strict=True
    ):
        if x2 - x1 < 1 or y2 - y1 < 1:
            raise ValueError(
                f"{image_record_name(record.image_id, record.file_name)}: box {[x1, y1, x2, y2]} is under 1 px, "
                "which VOC's 1-based pixel boxes cannot hold"
            )
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = names[cat]
        ET.SubElement(obj, "difficult").text = "1" if crowd else "0"
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, key).text = _number(value)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def write_voc(root: Path, splits: Mapping[str, DetectionSource]) -> list[str]:
    """Write sources as a VOC dataset under ``root``; return the class names to read it back with.

    Each split becomes ``ImageSets/Main/<split>.txt``; an image's id is its file name
    without the suffix. Image bytes are copied as read; crowd regions become
    ``difficult`` objects; boxes use VOC's 1-based pixel rule (so each side must be at
    least 1 px). Every split must have the same categories, with distinct names.
    """
    root = Path(root)
    if not splits:
        raise ValueError("write_voc: no splits given")
    ordered = [source.sorted_categories for source in splits.values()]
    if any(cats != ordered[0] for cats in ordered):
        raise ValueError("write_voc: every split must have the same categories")
    classes = [c.name for c in ordered[0]]
    if len(set(classes)) != len(classes):
        raise ValueError(f"write_voc: VOC names classes, so names must be distinct, got {classes}")
    names = {c.id: c.name for c in ordered[0]}
    for split, source in splits.items():
        ids = []
        for rec in source.records:
            relative = Path(rec.file_name)
            if relative.is_absolute() or ".." in relative.parts:
                raise ValueError(f"file_name {rec.file_name!r} must be a relative path inside the images folder")
            voc_id = relative.with_suffix("").as_posix()
            image = root / "JPEGImages" / relative
            data = source.image_reader(rec)
            if image.is_file() and image.read_bytes() != data:
                raise ValueError(f"write_voc: two different images are named {rec.file_name!r}")
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(data)
            xml_path = root / "Annotations" / f"{voc_id}.xml"
            xml_path.parent.mkdir(parents=True, exist_ok=True)
            _annotation_xml(rec, relative.as_posix(), names).write(xml_path, encoding="utf-8", xml_declaration=False)
            ids.append(voc_id)
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = split_file.with_name(f".{split_file.name}.tmp{os.getpid()}")
        try:
            tmp.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
            os.replace(tmp, split_file)
        finally:
            tmp.unlink(missing_ok=True)
    return classes
