"""Issue 26 point 2: phone and camera photos. A JPEG with an MPF preview (MPO, named .mpo or .jpg) and AVIF are
accepted by ingest and decoded by training; ingest and training accept exactly the same formats and modes, from the
one list in `dinoforge.data.formats`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, features

from curate.config import load_curate_config
from curate.sources.decode import DecodeLimits, probe_image
from curate.sources.ingest import IngestConfig, SourceConfig, ingest_sources
from dinoforge.config import ConfigError
from dinoforge.data.datasets import build_dataset
from dinoforge.data.decode import ImageDecodeError, decode_image
from dinoforge.data.formats import (
    DECODABLE_FORMATS,
    DECODABLE_MODES,
    EXTENSION_OF_FORMAT,
    IMAGE_EXTENSIONS,
    image_member,
)

RED, GREEN = (220, 20, 20), (20, 200, 20)
needs_avif = pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")


def mpo(first=(96, 64), preview=(32, 24)) -> bytes:
    """A JPEG followed by an MPF second frame, as phones and cameras write them: red photo, green preview."""
    buf = io.BytesIO()
    Image.new("RGB", first, RED).save(buf, format="MPO", save_all=True, append_images=[Image.new("RGB", preview,
                                                                                                 GREEN)])
    return buf.getvalue()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_mpo_is_a_jpeg_read_as_its_first_frame():
    data = mpo()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    image = decode_image(data)
    assert image.size == (96, 64)
    assert np.abs(np.asarray(image, dtype=int) - RED).max() < 12  # the photo, not the green preview
    assert decode_image(data, draft_size=16).size == (24, 16)  # decoded by the JPEG decoder: DCT downscaling applies


@pytest.mark.parametrize("name", ["phone.jpg", "camera.mpo", "PHONE.MPO"])
def test_ingest_and_training_take_mpo_photos(tmp_path, name):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / name).write_bytes(mpo())
    rows = ingest_sources([("pool", SourceConfig(str(tmp_path)))], IngestConfig(), n_partitions=1).to_pylist()
    assert [(r["format"], r["reject_reason"]) for r in rows] == [("MPO", None)]
    dataset = build_dataset(str(tmp_path))
    image, _ = dataset[0]
    assert image.size == (96, 64) and dataset.decode_errors == 0


@needs_avif
def test_ingest_and_training_take_avif(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "photo.avif").write_bytes(encode(Image.new("RGB", (64, 48), RED), "AVIF"))
    rows = ingest_sources([("pool", SourceConfig(str(tmp_path)))], IngestConfig(), n_partitions=1).to_pylist()
    assert [(r["format"], r["reject_reason"]) for r in rows] == [("AVIF", None)]
    image, _ = build_dataset(str(tmp_path))[0]
    assert image.size == (64, 48)


def _samples() -> dict[str, bytes]:
    """Files of decodable and undecodable formats and modes."""
    rgb = Image.new("RGB", (40, 32), RED)
    out = {"jpeg": encode(rgb, "JPEG"), "mpo": mpo(), "png": encode(rgb, "PNG"), "webp": encode(rgb, "WEBP"),
           "bmp": encode(rgb, "BMP"), "tiff": encode(rgb, "TIFF"), "ppm": encode(rgb, "PPM"),
           "gif_animated": encode(rgb.convert("P"), "GIF", save_all=True, append_images=[Image.new("P", (40, 32))]),
           "png_rgba": encode(rgb.convert("RGBA"), "PNG"), "png_la": encode(rgb.convert("LA"), "PNG"),
           "png_1": encode(rgb.convert("1"), "PNG"), "jpeg_cmyk": encode(rgb.convert("CMYK"), "JPEG"),
           "png_16bit": encode(Image.fromarray(np.full((32, 40), 40000, np.uint16)), "PNG"),
           "tiff_float": encode(Image.new("F", (40, 32), 0.5), "TIFF"),
           "tiff_int32": encode(Image.new("I", (40, 32), 7), "TIFF"),
           "ico": encode(rgb, "ICO", sizes=[(32, 32)]), "tga": encode(rgb, "TGA"), "pcx": encode(rgb, "PCX"),
           "sgi": encode(rgb, "SGI")}
    if features.check("avif"):
        out["avif"] = encode(rgb, "AVIF")
    return out


def test_ingest_and_training_accept_exactly_the_same_files():
    accepted = set()
    for name, data in _samples().items():
        probe = probe_image(data, DecodeLimits())
        try:
            decode_image(data)
            decoded, reason = True, None
        except ImageDecodeError as err:
            decoded, reason = False, err.reason
        assert probe.ok == decoded, (name, probe.reject_reason, reason)
        assert probe.reject_reason == reason, name
        if decoded:
            accepted.add(name)
    assert {"ico", "tga", "pcx", "sgi", "tiff_float", "tiff_int32"}.isdisjoint(accepted)
    assert {"jpeg", "mpo", "png", "webp", "bmp", "tiff", "ppm", "gif_animated", "png_rgba", "png_la", "png_1",
            "jpeg_cmyk", "png_16bit"} <= accepted


def test_ingest_may_narrow_the_formats_never_widen_them(tmp_path):
    assert DecodeLimits(formats=["JPEG"], modes=["RGB"]).formats == ["JPEG"]
    with pytest.raises(ValueError, match=r"ingest.limits.formats: ICO cannot be decoded by training"):
        DecodeLimits(formats=["JPEG", "ICO"])
    with pytest.raises(ValueError, match=r"ingest.limits.modes: F cannot be decoded"):
        DecodeLimits(modes=["RGB", "F"])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"path": str(tmp_path)}],
                                      "ingest": {"limits": {"formats": ["JPEG", "PSD"]}}}))
    with pytest.raises(ConfigError, match=r"ingest.limits.formats: PSD"):
        load_curate_config(config)


def test_every_decodable_format_has_a_shard_extension_that_readers_find():
    assert set(EXTENSION_OF_FORMAT) == set(DECODABLE_FORMATS)
    for fmt, ext in EXTENSION_OF_FORMAT.items():
        assert image_member(["json", ext]) == ext, fmt
    assert {"mpo", "avif"} <= set(IMAGE_EXTENSIONS)
    assert "I" not in DECODABLE_MODES and "F" not in DECODABLE_MODES


def test_folder_readers_list_mpo_and_avif_files(tmp_path: Path):
    (tmp_path / "cls").mkdir()
    for name in ("a.mpo", "b.AVIF", "c.jpg"):
        (tmp_path / "cls" / name).write_bytes(b"")
    dataset = build_dataset(str(tmp_path))
    assert len(dataset) == 3 and not dataset.source.rejected
