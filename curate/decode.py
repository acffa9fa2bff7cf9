"""Safe probing and decoding of untrusted image bytes: every failure becomes a specific rejection reason.

The probe runs once per input at ingest. It reads the header first (format, size, mode) so that a decompression
bomb is refused before any pixel is decoded, then decodes the whole image to catch truncated or corrupt data,
which a header check alone does not see.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

# PIL format names; GIF/TIFF decode their first frame.
DEFAULT_FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM"]
# Modes that convert to RGB without losing meaning (16-bit greyscale is scaled to 8 bits, see `to_rgb`); 32-bit
# integer and float modes ("I", "F") have no fixed range to scale from, so they are refused by default.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L")
DEFAULT_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", *SIXTEEN_BIT_MODES]

# File extension used for each format when the original bytes are written into a WebDataset shard.
EXTENSION_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif",
                       "PPM": "ppm"}


@dataclass
class DecodeLimits:
    """What ingest accepts as an image."""

    max_pixels: int = 100_000_000  # width * height above this is treated as a decompression bomb
    min_side: int = 16  # thumbnails and tracking pixels carry no training signal
    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))


@dataclass(frozen=True)
class ImageProbe:
    """The outcome of probing one input: header facts when readable, and `reject_reason` when not acceptable."""

    format: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    reject_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reject_reason is None


class ImageRejected(ValueError):
    """Raised by `decode_rgb` with the same reason the probe would record."""


def probe_image(data: bytes, limits: DecodeLimits) -> ImageProbe:
    """Check that `data` is an acceptable, fully decodable image; never raises on bad input."""
    if len(data) == 0:
        return ImageProbe(reject_reason="empty file (0 bytes)")
    header = _read_header(data, limits)
    if not header.ok:
        return header
    try:
        _decode_fully(data)
    except Exception as err:  # noqa: BLE001 - any decoder failure on untrusted bytes is a rejection, not a crash
        return ImageProbe(header.format, header.width, header.height, header.mode,
                          reject_reason=f"truncated or corrupt image data: {_short(err)}")
    return header


def decode_rgb(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode `data` to an RGB PIL image, raising `ImageRejected(reason)` for anything the probe would refuse."""
    if len(data) == 0:
        raise ImageRejected("empty file (0 bytes)")
    header = _read_header(data, limits)
    if not header.ok:
        raise ImageRejected(header.reject_reason)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        return to_rgb(img)
    except Exception as err:  # noqa: BLE001
        raise ImageRejected(f"truncated or corrupt image data: {_short(err)}") from err


def _read_header(data: bytes, limits: DecodeLimits) -> ImageProbe:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; PIL's warning threshold is a process-wide global we do not touch.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return ImageProbe(reject_reason=f"decompression bomb: {_short(err)}")
    except UnidentifiedImageError:
        return ImageProbe(reject_reason=_unidentified(data))
    except Exception as err:  # noqa: BLE001
        return ImageProbe(reject_reason=f"not an image: {_short(err)}")
    fmt, (width, height), mode = img.format, img.size, img.mode
    probe = ImageProbe(fmt, width, height, mode)
    if fmt not in limits.formats:
        reason = f"unsupported format {fmt} (accepted: {', '.join(limits.formats)})"
    elif width * height > limits.max_pixels:
        reason = f"decompression bomb: {width}x{height} = {width * height} pixels > limit {limits.max_pixels}"
    elif min(width, height) < limits.min_side:
        reason = f"too small: {width}x{height}, shortest side < {limits.min_side}"
    elif mode not in limits.modes:
        reason = f"unsupported mode {mode} (accepted: {', '.join(limits.modes)})"
    else:
        return probe
    return ImageProbe(fmt, width, height, mode, reject_reason=reason)


def _decode_fully(data: bytes) -> None:
    """Decode every byte of the image; raises on truncated or corrupt data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # structural checks (PNG chunk CRCs...) that load() skips
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                # DCT-domain downscaling still entropy-decodes the whole stream (so truncation is caught) at a
                # fraction of the cost of a full-resolution decode.
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()


def _unidentified(data: bytes) -> str:
    """Why PIL cannot open `data`. PIL says only "cannot identify image file"; bytes that start with the signature of
    a format are a corrupt file of that format (a PNG whose header checksum is wrong...), and that format's own
    plugin says what is wrong with it."""
    Image.init()
    for fmt, (factory, accept) in Image.OPEN.items():
        if accept is not None and accept(data[:16]) is True:
            try:
                factory(io.BytesIO(data), "")
            except Exception as err:  # noqa: BLE001 - plugins raise SyntaxError, struct.error, ValueError...
                return f"corrupt {fmt}: {_short(err)}"
    return f"not an image: no known image format in the first bytes {data[:8]!r}"


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB copy of `img`: alpha composited onto white, 16-bit greyscale scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite onto white: converting straight to RGB would expose whatever colour hides under alpha=0.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode in SIXTEEN_BIT_MODES:
        # PIL's own conversion clips every value above 255 to white; 65535 / 257 = 255 (as dinoforge.data.decode).
        img = img.point(lambda v: v * (255 / 65535)).convert("L")
    return img.convert("RGB")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
