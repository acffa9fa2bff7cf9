"""Which file names hold images and labels: the one list of image suffixes every reader and stage uses."""

from __future__ import annotations

from collections.abc import Iterable

# WebDataset member extensions holding a sample's image, in order of preference when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
IMAGE_SUFFIXES = frozenset(f".{ext}" for ext in IMAGE_EXTENSIONS)  # file names on disk (lowercased suffix)
LABEL_EXTENSIONS = ("json", "cls")  # `<key>.json` with an integer "label" (curate output) or `<key>.cls` text
# File extension used for each PIL format when original bytes are written into a WebDataset shard.
EXTENSION_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif",
                       "PPM": "ppm"}


def image_member(extensions: Iterable[str]) -> str | None:
    """The member extension (as given) holding the sample's image, by `IMAGE_EXTENSIONS` preference, or None.

    As webdataset's decoders do, a multi-dot extension counts by its last part: `seg.png` is a PNG.
    """
    by_last_part: dict[str, str] = {}
    for ext in extensions:
        by_last_part.setdefault(ext.rsplit(".", 1)[-1], ext)
    return next((by_last_part[e] for e in IMAGE_EXTENSIONS if e in by_last_part), None)


def label_member(extensions: Iterable[str]) -> str | None:
    """The member extension holding the sample's label, or None."""
    present = set(extensions)
    return next((e for e in LABEL_EXTENSIONS if e in present), None)
