"""Safe image decoding: bytes -> RGB PIL image, or an `ImageDecodeError` that says why not.

Every reader in dinoforge (datasets, streaming shards, curation) decodes through `decode_image`, so a broken file
is reported the same way everywhere and the pixel limit against decompression bombs is checked before any pixel
data is decompressed, independently of PIL's process-wide `Image.MAX_IMAGE_PIXELS`.
"""

from __future__ import annotations

import io
import warnings

import torch
import torch.utils.data
from PIL import Image, UnidentifiedImageError

# A 10,000 x 10,000 photo decodes to 300 MB of RGB; larger is almost always a bomb or a scan we do not want.
DEFAULT_MAX_PIXELS = 100_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image within limits; `reason` is a short human-readable cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` into a fully loaded RGB image; raise `ImageDecodeError(reason)` for anything else.

    Reasons: empty data, unrecognised format, more than `max_pixels` pixels (checked from the header, before
    decompression), truncated or corrupt pixel data.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) between its limit and twice it; our own check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"decompression bomb refused by PIL: {err}") from None
    except UnidentifiedImageError:
        head = data[:8]
        raise ImageDecodeError(f"not an image: unrecognised format ({len(data)} bytes, starting {head!r})") from None
    except Exception as err:  # PIL raises many types (SyntaxError, struct.error, ...) for malformed headers
        raise ImageDecodeError(f"unreadable image header: {type(err).__name__}: {err}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} = {width * height} pixels > max_pixels={max_pixels} "
            "(possible decompression bomb; raise max_pixels if the image is legitimate)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            return _to_rgb(image)
    except Exception as err:  # truncated data: OSError; corrupt streams: SyntaxError, ValueError, zlib.error...
        kind = f"{image.format} " if image.format else ""
        raise ImageDecodeError(f"corrupt or truncated {kind}image data: {type(err).__name__}: {err}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; palette/greyscale images with transparency go through RGBA so PIL does not warn."""
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "LA", "PA") or (image.mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: PIL's direct RGB conversion clips at 255, so rescale to 8 bits first.
        image = image.point(lambda v: v * (255 / 65535)).convert("L")
    return image.convert("RGB")


class DecodeErrorCounter:
    """A count of unreadable samples shared by a dataset and its DataLoader worker processes.

    Workers are separate processes, so a plain integer attribute would only count the main process's errors. The
    count lives in a shared-memory tensor, which torch's multiprocessing shares with workers started by fork or
    spawn; each worker adds to its own slot, so no lock is needed. Ordinary copies (pickle, deepcopy) get their
    own memory, starting from the current counts.
    """

    SLOTS = 256  # slot 0: the main process; slot 1 + worker id (mod 255): DataLoader workers

    def __init__(self, value: int = 0) -> None:
        self._slots = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()
        self._slots[0] = value

    @property
    def value(self) -> int:
        return int(self._slots.sum())

    def add(self, n: int = 1) -> None:
        worker = torch.utils.data.get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (self.SLOTS - 1)
        self._slots[slot] += n

    def __repr__(self) -> str:
        return f"DecodeErrorCounter({self.value})"
