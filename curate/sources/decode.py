"""Ingest's acceptance of untrusted image bytes, on top of the one decoder (`dinoforge.data.decode`).

The probe runs once per input at ingest. It reads the header first (format, size, mode) so that a decompression
bomb is refused before any pixel is decoded, then decodes the whole image to catch truncated or corrupt data,
which a header check alone does not see. What ingest adds to the decoder is only what it accepts (formats, modes,
a smallest side, a narrower choice of the decoder's formats and modes); pixels come from `decode_image` under
`DEFAULT_POLICY`, as in training and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from PIL import Image

from dinoforge.data.decode import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_POLICY,
    ImageDecodeError,
    check_decodable,
    decode_image,
    format_problem,
    mode_problem,
    open_image,
    pixel_limit_problem,
)
from dinoforge.data.formats import DECODABLE_FORMATS, DECODABLE_MODES


@dataclass
class DecodeLimits:
    """What ingest accepts as an image. Formats and modes default to every one that training and evaluation decode
    (`dinoforge.data.formats`); a config may narrow them, never widen them: training would refuse the extra ones."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # width * height above this is treated as a decompression bomb
    min_side: int = 16  # thumbnails and tracking pixels carry no training signal
    # Longest side / shortest side above this is refused: a 20000x20 strip yields only degenerate crops (a random
    # resized crop of it is a smear, its resize to a square a blur). Ingest only, like min_side: training takes any.
    max_aspect: float = 10.0
    formats: list[str] = field(default_factory=lambda: list(DECODABLE_FORMATS))
    modes: list[str] = field(default_factory=lambda: list(DECODABLE_MODES))

    def __post_init__(self) -> None:
        for key in ("max_pixels", "min_side", "max_aspect"):
            if getattr(self, key) < 1:
                raise ValueError(f"ingest.limits.{key}={getattr(self, key)}: must be >= 1")
        for key, values, decodable in (("formats", self.formats, DECODABLE_FORMATS),
                                       ("modes", self.modes, DECODABLE_MODES)):
            extra = [v for v in values if v not in decodable]
            if extra:
                raise ValueError(f"ingest.limits.{key}: {', '.join(map(str, extra))} cannot be decoded by training "
                                 f"and evaluation; choose among {', '.join(decodable)}")


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


class ImageRejected(ImageDecodeError):
    """Raised by `decode_rgb` with the same reason the probe would record."""


def probe_image(data: bytes, limits: DecodeLimits) -> ImageProbe:
    """Check that `data` is an acceptable, fully decodable image; never raises on bad input."""
    header = _read_header(data, limits)
    if not header.ok:
        return header
    try:
        check_decodable(data)
    except ImageDecodeError as err:
        return replace(header, reject_reason=err.reason)
    return header


def decode_rgb(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode `data` to RGB with the default policy, raising `ImageRejected(reason)` for anything the probe would
    refuse."""
    header = _read_header(data, limits)
    if not header.ok:
        raise ImageRejected(header.reject_reason)
    try:
        return decode_image(data, DEFAULT_POLICY, max_pixels=limits.max_pixels)
    except ImageDecodeError as err:
        raise ImageRejected(err.reason) from err


def aspect_problem(width: int, height: int, max_aspect: float) -> str | None:
    """The rejection reason of a `width` x `height` image under `max_aspect` (longest side / shortest), or None."""
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        return f"too elongated: {width}x{height}, aspect ratio {aspect:.3g} > max_aspect {max_aspect:g}"
    return None


def _read_header(data: bytes, limits: DecodeLimits) -> ImageProbe:
    try:
        img = open_image(data, limits.max_pixels)
    except ImageDecodeError as err:
        return ImageProbe(reject_reason=err.reason)
    fmt, (width, height), mode = img.format, img.size, img.mode
    probe = ImageProbe(fmt, width, height, mode)
    too_small = min(width, height) < limits.min_side
    reason = (format_problem(fmt, limits.formats) or pixel_limit_problem(width, height, limits.max_pixels)
              or (f"too small: {width}x{height}, shortest side < {limits.min_side}" if too_small else None)
              or aspect_problem(width, height, limits.max_aspect)
              or mode_problem(mode, limits.modes))
    return probe if reason is None else replace(probe, reject_reason=reason)
