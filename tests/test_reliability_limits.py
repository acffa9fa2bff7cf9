"""Issue 26 point 4: limits say what they are. The configured `ingest.limits.max_pixels` is the one pixel limit (PIL's
own process-wide one does not reject below it), its reason gives width and height, and `max_aspect` rejects strips."""

from __future__ import annotations

import io

import pytest
import yaml
from PIL import Image

from curate.config import load_curate_config
from curate.sources.decode import DecodeLimits, decode_rgb, probe_image
from curate.sources.ingest import IngestConfig, SourceConfig, ingest_sources
from dinoforge.config import ConfigError
from dinoforge.data.decode import ImageDecodeError, decode_image


def encode(size, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 140, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def low_pil_limit(monkeypatch):
    """PIL's own limit far below the image: PIL refuses above 2 * MAX_IMAGE_PIXELS = 2,000 pixels (64x48 = 3,072),
    as it refuses above 179M pixels at its default."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


@pytest.mark.parametrize(("fmt", "size"), [("PNG", (64, 48)), ("JPEG", (64, 48)), ("GIF", (64, 48)),
                                           ("PNG", (63, 49))])  # 63 x 49: an odd number of pixels
def test_the_configured_pixel_limit_is_the_one_limit(low_pil_limit, fmt, size):
    data = encode(size, fmt)
    pixels = size[0] * size[1]
    limits = DecodeLimits(max_pixels=pixels)  # exactly the image: accepted
    probe = probe_image(data, limits)
    assert probe.ok, probe.reject_reason
    assert decode_rgb(data, limits).size == size
    assert decode_image(data, max_pixels=pixels).size == size  # training and evaluation decode it too


def test_pil_limit_is_raised_never_lowered(low_pil_limit):
    decode_image(encode((64, 48)), max_pixels=10_000)
    assert Image.MAX_IMAGE_PIXELS == 5_000
    decode_image(encode((64, 48)), max_pixels=4_000)  # a smaller limit elsewhere leaves PIL's at the larger
    assert Image.MAX_IMAGE_PIXELS == 5_000


def test_above_the_configured_limit_the_reason_gives_width_and_height(low_pil_limit):
    probe = probe_image(encode((64, 48)), DecodeLimits(max_pixels=64 * 48 - 1))
    assert probe.reject_reason == "decompression bomb: 64x48 = 3072 pixels > limit 3071"
    assert (probe.width, probe.height) == (64, 48)
    with pytest.raises(ImageDecodeError, match="64x48"):
        decode_image(encode((64, 48)), max_pixels=64 * 48 - 1)


@pytest.mark.parametrize(("size", "ok"), [((200, 20), True), ((20, 200), True), ((201, 20), False),
                                          ((20, 201), False), ((2000, 20), False), ((64, 48), True)])
def test_max_aspect_rejects_strips(size, ok):
    probe = probe_image(encode(size), DecodeLimits())  # default max_aspect 10: 10:1 exactly is kept
    assert probe.ok == ok, probe.reject_reason
    if not ok:
        assert probe.reject_reason.startswith(f"too elongated: {size[0]}x{size[1]}, aspect ratio")
        assert probe.reject_reason.endswith("> max_aspect 10")


def test_max_aspect_is_configurable_and_checked(tmp_path):
    assert DecodeLimits().max_aspect == 10
    assert probe_image(encode((2000, 20)), DecodeLimits(max_aspect=100)).ok
    (tmp_path / "strip.png").write_bytes(encode((2000, 20)))
    rows = ingest_sources([("pool", SourceConfig(str(tmp_path)))], IngestConfig(), n_partitions=1).to_pylist()
    assert rows[0]["reject_reason"] == "too elongated: 2000x20, aspect ratio 100 > max_aspect 10"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"path": str(tmp_path)}], "ingest": {"limits": {"max_aspect": 0.5}}}))
    with pytest.raises(ConfigError, match=r"ingest.limits.max_aspect=0.5: must be >= 1"):
        load_curate_config(config)


@pytest.mark.parametrize("key", ["max_pixels", "min_side", "max_aspect"])
def test_limits_below_one_are_config_errors(key):
    with pytest.raises(ValueError, match=rf"ingest.limits.{key}=0: must be >= 1"):
        DecodeLimits(**{key: 0})
    DecodeLimits(**{key: 1})
