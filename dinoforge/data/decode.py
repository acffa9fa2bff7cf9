"""The one image decoder and its policy: bytes -> RGB PIL image, or an `ImageDecodeError` that says why not.

Curation (ingest probe, embedding, report thumbnails), training (dataset readers, streaming shards) and evaluation
all decode through `decode_image` with `DEFAULT_POLICY`, so one file gives the same pixels in every stage:
  - EXIF orientation is applied: phones store photos unrotated and tag them, and every viewer shows them upright;
  - alpha is composited onto white (converting straight to RGB exposes whatever colour hides under alpha=0);
  - 16-bit greyscale is scaled by 255/65535 (PIL's own conversion clips every value above 255 to white);
  - the pixel limit against decompression bombs is checked from the header, before any pixel is decompressed; it is
    the one limit: PIL's own process-wide one (`Image.MAX_IMAGE_PIXELS`) is raised to it when it is lower;
  - only the formats and modes of `dinoforge.data.formats` are taken (what curation's ingest accepts by default),
    a multi-frame file (GIF, TIFF, MPO) as its first frame.
A stage that truly needs another behaviour passes another `DecodePolicy`, never a second decoder. This module is
torch-free: curate's ingest workers import it. Every process that decodes logs once which PIL build it decodes with
(`decoder_name`: pillow, or pillow-simd after `make simd`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import logging
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

from dinoforge.data.formats import DECODABLE_FORMATS, DECODABLE_MODES, JPEG_FORMATS, SIXTEEN_BIT_MODES

# A 10,000 x 10,000 photo decodes to 300 MB of RGB; larger is almost always a bomb or a scan we do not want.
DEFAULT_MAX_PIXELS = 100_000_000
ALPHA_MODES = ("white", "drop")
_EXIF_ORIENTATION = 0x0112
_PIL_LIMIT_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodePolicy:
    """How encoded bytes become RGB pixels; `DEFAULT_POLICY` is what curation, training and evaluation use."""

    exif: bool = True  # apply the EXIF orientation tag
    alpha: str = "white"  # "white": composite transparent pixels onto white; "drop": discard the alpha channel
    scale_sixteen_bit: bool = True  # 16-bit greyscale * 255/65535; False: PIL's conversion (clips above 255)
    max_pixels: int = DEFAULT_MAX_PIXELS  # width * height above this is refused as a possible decompression bomb
    formats: tuple[str, ...] = DECODABLE_FORMATS  # PIL format names taken; others are refused
    modes: tuple[str, ...] = DECODABLE_MODES  # PIL modes taken; others are refused

    def __post_init__(self) -> None:
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"DecodePolicy.alpha={self.alpha!r}: use one of {', '.join(ALPHA_MODES)}")
        if self.max_pixels < 1:
            raise ValueError(f"DecodePolicy.max_pixels must be positive, got {self.max_pixels}")


DEFAULT_POLICY = DecodePolicy()


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image within limits; `reason` is a short human-readable cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, policy: DecodePolicy = DEFAULT_POLICY, *, max_pixels: int | None = None,
                 draft_size: int | None = None) -> Image.Image:
    """Decode `data` into a fully loaded RGB image under `policy`; raise `ImageDecodeError(reason)` otherwise.

    `max_pixels` overrides `policy.max_pixels`. `draft_size` lets JPEG decoding downscale in the DCT domain while
    keeping both sides at least that large (curation's embedding uses it for speed; the pixels then differ).
    Reasons: empty data, unrecognised or corrupt format, too many pixels (checked from the header, before
    decompression), truncated or corrupt pixel data.
    """
    if max_pixels is not None:
        policy = replace(policy, max_pixels=max_pixels)
    image = open_image(data, policy.max_pixels)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid image size {width}x{height}")
    problem = (format_problem(image.format, policy.formats) or pixel_limit_problem(width, height, policy.max_pixels)
               or mode_problem(image.mode, policy.modes))
    if problem is not None:
        raise ImageDecodeError(problem)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if draft_size and image.format in JPEG_FORMATS:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return to_rgb(image, policy)
    except Exception as err:  # truncated data: OSError; corrupt streams: SyntaxError, ValueError, zlib.error...
        raise ImageDecodeError(f"truncated or corrupt image data: {short_error(err)}") from None


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The lazily opened image (header read, no pixel decoded); `ImageDecodeError` when it is not an image.

    Images up to `max_pixels` open whatever PIL's own limit; the caller checks `max_pixels` (`pixel_limit_problem`).
    """
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    log_decoder()
    raise_pil_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) between its limit and twice it; our own check decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"decompression bomb: {short_error(err)}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(_unidentified(data)) from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types (SyntaxError, struct.error...) for bad headers
        raise ImageDecodeError(f"not an image: {short_error(err)}") from None


def pil_distributions() -> dict[str, str]:
    """name -> version of the pillow distributions recorded beside the imported `PIL` package (its site dir)."""
    site = str(Path(PIL.__file__).resolve().parent.parent)
    found = {(d.metadata["Name"] or "").lower(): d.version for d in importlib.metadata.distributions(path=[site])}
    return {name: version for name, version in found.items() if name in ("pillow", "pillow-simd")}


def decoder_name() -> str:
    """`pillow-simd X` or `pillow X`: the PIL build this process decodes (and resizes) with.

    Both install the same `PIL` package, so the import alone does not say which. pillow-simd numbers every release
    `<pillow version>.postN` (pillow never publishes .post releases); a pillow-simd record beside PIL with the running
    version counts too (a build from a git checkout may lack the suffix). Its record alone does not: pip installing
    pillow over pillow-simd (`make venv` does) overwrites the files and leaves both records.
    """
    version = PIL.__version__
    simd = ".post" in version or pil_distributions().get("pillow-simd") == version
    return f"{'pillow-simd' if simd else 'pillow'} {version}"


@functools.cache
def log_decoder() -> str:
    """Log `decoder_name()` once per process (data workers forked after the first call inherit the cache)."""
    name = decoder_name()
    logger.info("images decoded with %s", name)
    return name


def format_problem(fmt: str | None, formats: tuple[str, ...] | list[str]) -> str | None:
    """The rejection reason of a file of PIL format `fmt` when only `formats` are taken, or None."""
    return None if fmt in formats else f"unsupported format {fmt} (accepted: {', '.join(formats)})"


def mode_problem(mode: str, modes: tuple[str, ...] | list[str]) -> str | None:
    """The rejection reason of an image of PIL mode `mode` when only `modes` are taken, or None."""
    return None if mode in modes else f"unsupported mode {mode} (accepted: {', '.join(modes)})"


def pixel_limit_problem(width: int, height: int, max_pixels: int) -> str | None:
    """The rejection reason of an image of this size under `max_pixels`, or None."""
    if width * height > max_pixels:
        return f"decompression bomb: {width}x{height} = {width * height} pixels > limit {max_pixels}"
    return None


def raise_pil_limit(max_pixels: int) -> None:
    """Let PIL open images of up to `max_pixels`: it refuses on its own any above 2 * `Image.MAX_IMAGE_PIXELS` (179M
    pixels by default), which would make a configured limit above that a silent second one. Only ever raised (under
    a lock, so concurrent decoders with different limits keep the largest), never lowered or removed; safe because
    every caller checks its own limit from the header before any pixel is decompressed."""
    with _PIL_LIMIT_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and 2 * current < max_pixels:
            Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2


def check_decodable(data: bytes) -> None:
    """Decode every byte of the image, raising `ImageDecodeError` on truncated or corrupt data (ingest's check, after
    `open_image` and the header checks)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.verify()  # structural checks (PNG chunk CRCs...) that load() skips
            with Image.open(io.BytesIO(data)) as img:
                if img.format in JPEG_FORMATS:
                    # DCT-domain downscaling still entropy-decodes the whole stream (so truncation is caught) at a
                    # fraction of the cost of a full-resolution decode.
                    img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure on untrusted bytes is a rejection, not a crash
        raise ImageDecodeError(f"truncated or corrupt image data: {short_error(err)}") from None


def to_rgb(image: Image.Image, policy: DecodePolicy = DEFAULT_POLICY) -> Image.Image:
    """An RGB image of a loaded `image` under `policy` (orientation, alpha, 16-bit greyscale)."""
    if policy.exif and image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        if policy.alpha == "drop":
            return rgba.convert("RGB")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if policy.scale_sixteen_bit and image.mode in (*SIXTEEN_BIT_MODES, "I"):
        image = image.point(lambda v: v * (255 / 65535)).convert("L")
    return image.convert("RGB")


def _unidentified(data: bytes) -> str:
    """Why PIL cannot open `data`. PIL says only "cannot identify image file"; bytes that start with the signature of
    a format are a corrupt file of that format (a PNG whose header checksum is wrong...), and that format's own
    plugin says what is wrong with it."""
    Image.init()
    for fmt, (factory, accept) in Image.OPEN.items():
        if accept is not None and _accepts(accept, data[:16]):
            try:
                factory(io.BytesIO(data), "")
            except Exception as err:  # noqa: BLE001 - plugins raise SyntaxError, struct.error, ValueError...
                return f"corrupt {fmt}: {short_error(err)}"
    # The reason names no byte of the content: a link to a private file must not copy it into manifests and reports.
    return f"not an image: no known image format signature in its first bytes ({len(data)} bytes in all)"


def _accepts(accept, prefix: bytes) -> bool:
    """A plugin's signature check, which may itself fail on a prefix shorter than it reads (BMP's reads 4 bytes and
    raises struct.error on 1 to 3)."""
    try:
        return accept(prefix) is True
    except Exception:  # noqa: BLE001 - a failed signature check means "not this format"
        return False


def short_error(err: BaseException) -> str:
    """`Type: first line of the message`, for one-line rejection reasons."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
