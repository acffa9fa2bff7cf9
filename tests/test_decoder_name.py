"""The one decoder names the PIL build it decodes with (pillow or pillow-simd, `make simd`) and logs it once a
process."""

from __future__ import annotations

import io
import logging

import PIL
from PIL import Image

from dinoforge.data import decode
from dinoforge.data.decode import decode_image, decoder_name


def test_pillow_simd_is_told_by_its_post_version(monkeypatch):
    monkeypatch.setattr(decode, "pil_distributions", lambda: {"pillow": "13.0.0"})
    monkeypatch.setattr(PIL, "__version__", "12.1.1.post0")
    assert decoder_name() == "pillow-simd 12.1.1.post0"
    monkeypatch.setattr(PIL, "__version__", "13.0.0")
    assert decoder_name() == "pillow 13.0.0"


def test_pillow_simd_is_told_by_its_distribution_without_the_suffix(monkeypatch):
    monkeypatch.setattr(decode, "pil_distributions", lambda: {"pillow-simd": "12.1.1"})
    monkeypatch.setattr(PIL, "__version__", "12.1.1")  # a build from a git checkout
    assert decoder_name() == "pillow-simd 12.1.1"


def test_pillow_installed_over_pillow_simd_is_pillow(monkeypatch):
    # pip installing pillow over pillow-simd overwrites PIL and leaves both records
    monkeypatch.setattr(decode, "pil_distributions", lambda: {"pillow-simd": "12.1.1.post0", "pillow": "13.0.0"})
    monkeypatch.setattr(PIL, "__version__", "13.0.0")
    assert decoder_name() == "pillow 13.0.0"


def test_the_installed_distribution_is_found_beside_pil():
    assert PIL.__version__ in decode.pil_distributions().values()
    assert decoder_name().endswith(PIL.__version__)


def test_the_decoder_is_logged_once_a_process(monkeypatch, caplog):
    decode.log_decoder.cache_clear()
    monkeypatch.setattr(PIL, "__version__", "12.1.1.post0")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with caplog.at_level(logging.INFO, logger="dinoforge.data.decode"):
        for _ in range(3):
            decode_image(buf.getvalue())
    lines = [r.getMessage() for r in caplog.records if "images decoded with" in r.getMessage()]
    assert lines == ["images decoded with pillow-simd 12.1.1.post0"]
    decode.log_decoder.cache_clear()  # other tests' processes log the real build
