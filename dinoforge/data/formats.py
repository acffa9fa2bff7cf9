"""Which images every stage reads: the one list of decodable formats and modes, and of the file names that hold
images and labels."""

from __future__ import annotations

from collections.abc import Iterable

# The PIL formats every stage decodes: ingest accepts these (or a configured subset), and training and evaluation
# decode exactly these, so a file kept by curation is never refused by training. Multi-frame files are read as their
# first frame: an animated GIF, a multi-page TIFF, and MPO, a JPEG followed by an MPF preview or second view (as
# many phones and cameras write, often named .jpg), whose first frame is the photo itself.
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "AVIF", "BMP", "TIFF", "GIF", "PPM")
JPEG_FORMATS = ("JPEG", "MPO")  # decoded by the JPEG decoder, so DCT-domain downscaling (draft) applies
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L")
# Modes that convert to RGB without losing meaning (16-bit greyscale is scaled to 8 bits by the decoder); 32-bit
# integer and float modes ("I", "F") have no fixed range to scale from, so no stage takes them.
DECODABLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", *SIXTEEN_BIT_MODES)

# WebDataset member extensions holding a sample's image, in order of preference when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "mpo", "png", "webp", "avif", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
IMAGE_SUFFIXES = frozenset(f".{ext}" for ext in IMAGE_EXTENSIONS)  # file names on disk (lowercased suffix)
LABEL_EXTENSIONS = ("json", "cls")  # `<key>.json` with an integer "label" (curate output) or `<key>.cls` text
# File extension used for each PIL format when original bytes are written into a WebDataset shard (an MPO is a JPEG
# that carries more frames after the first, so viewers and webdataset's decoders read it as one).
EXTENSION_OF_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "AVIF": "avif", "BMP": "bmp",
                       "TIFF": "tiff", "GIF": "gif", "PPM": "ppm"}


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
