"""decode_image: real and synthetic images decode to RGB; every kind of broken file is a clear ImageDecodeError."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
from PIL import Image
from test_data_fixtures import broken_images, image_files, imagenette_subset, jpeg_bytes, png_header_only

from dinoforge.data.decode import DEFAULT_MAX_PIXELS, DecodePolicy, ImageDecodeError, decode_image
from dinoforge.data.error_counter import DecodeErrorCounter


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_real_jpegs_decode_to_rgb_matching_pil() -> None:
    root = imagenette_subset()
    for path in image_files(root)[::10]:
        image = decode_image(path.read_bytes())
        assert image.mode == "RGB" and image.size == (224, 224)
        with Image.open(path) as reference:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(reference.convert("RGB")))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", "truncated"),
        ("zero_bytes", "empty file"),
        ("text", "not an image"),
        ("bomb", "decompression bomb"),
        ("big", "pixels > limit"),
    ],
)
def test_broken_files_raise_with_reason(kind: str, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(broken_images()[kind])
    assert reason in info.value.reason
    assert str(info.value) == info.value.reason


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = jpeg_bytes(64, 48)
    assert decode_image(data, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageDecodeError, match="3072 pixels > limit 3071"):
        decode_image(data, max_pixels=64 * 48 - 1)
    # Header-only PNG just over the default limit: refused by our check, not by a failed decode of missing data.
    with pytest.raises(ImageDecodeError, match="decompression bomb: 10001x10000"):
        decode_image(png_header_only(10_001, 10_000), max_pixels=DEFAULT_MAX_PIXELS)


def test_modes_convert_to_rgb_with_correct_values() -> None:
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    rgb = np.asarray(decode_image(encode(grey, "PNG")))
    assert rgb.shape == (8, 8, 3)
    np.testing.assert_array_equal(rgb, np.repeat(np.asarray(grey)[..., None], 3, axis=2))

    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))  # 16-bit white must stay white
    assert np.asarray(decode_image(encode(deep, "PNG"))).min() == 255

    rgba = Image.new("RGBA", (5, 5), (10, 20, 30, 0))  # transparent: white by default, the hidden colour on request
    np.testing.assert_array_equal(np.asarray(decode_image(encode(rgba, "PNG")))[0, 0], [255, 255, 255])
    dropped = decode_image(encode(rgba, "PNG"), DecodePolicy(alpha="drop"))
    np.testing.assert_array_equal(np.asarray(dropped)[0, 0], [10, 20, 30])

    palette = Image.new("P", (5, 5), 3)
    palette.info["transparency"] = 3
    assert decode_image(encode(palette, "PNG")).mode == "RGB"

    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(cmyk, "JPEG"))).min() > 240  # no ink is white


def test_counter_copies_outside_process_start_are_independent() -> None:
    counter = DecodeErrorCounter()
    counter.add(3)
    clone = pickle.loads(pickle.dumps(counter))
    deep = copy.deepcopy(counter)
    clone.add()
    assert (counter.value, clone.value, deep.value) == (3, 4, 3)
