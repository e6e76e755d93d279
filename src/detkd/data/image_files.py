"""Image files on disk as the YOLO and VOC readers see them: which suffixes count, and their size.

Images whose EXIF orientation tag asks for a rotation or flip are refused. Ultralytics
(and most labelling tools) draw boxes on the upright image, while detkd decodes the
pixels as stored; accepting such a file would silently pair boxes with the wrong pixels.
Rewriting it upright (``PIL.ImageOps.exif_transpose`` and saving) keeps its labels valid.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

__all__ = ["IMG_FORMATS", "ImageFileError", "image_size", "is_image_file"]

# Ultralytics' IMG_FORMATS: the suffixes a YOLO dataset folder is searched for.
IMG_FORMATS = frozenset({"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm"})
EXIF_ORIENTATION = 0x0112  # 1 = upright; 2..8 = mirrored and/or rotated


class ImageFileError(ValueError):
    """An image file that cannot be used; the message says why (the caller names the file)."""


def is_image_file(path: Path) -> bool:
    return path.suffix[1:].lower() in IMG_FORMATS


def image_size(path: Path, *, decode: bool) -> tuple[int, int]:
    """(width, height) from the file's header; ``decode`` also decodes every pixel.

    Raises :class:`ImageFileError` for an unreadable or corrupt file, or one with an
    EXIF orientation other than upright.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            # The base class reads the EXIF the header gave; PNG's own getexif() decodes the whole
            # image to look for an eXIf chunk after the pixels, which no common writer emits.
            orientation = Image.Image.getexif(im).get(EXIF_ORIENTATION, 1)
        if decode:
            with Image.open(path) as im:
                im.verify()  # structure and checksums; the file must be reopened after this
            with Image.open(path) as im:
                im.load()  # decode the pixels: catches truncated data verify() misses
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise ImageFileError(f"unreadable or corrupt image: {exc}") from None
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        raise ImageFileError(
            f"EXIF orientation {orientation} (rotated or mirrored): detkd reads pixels as stored, "
            "so boxes drawn on the upright image would not match; save the image upright "
            "(PIL.ImageOps.exif_transpose) without the tag"
        )
    return size
