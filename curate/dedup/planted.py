"""Planted copies: altered copies of real photos, the ground truth that copy detection and decontamination are
measured against (tests/test_curate_quality.py plants them in a pool, bench/bench_curation_value.py in a pretraining
pool). The alterations are what a scraped copy of a photo goes through: re-encoding and resizing always, a crop, a
mirror and a mild colour change sometimes."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageEnhance, ImageOps


def plant_copy(data: bytes, rng: random.Random) -> bytes:
    """A re-encoded (JPEG quality 30-90), resized (0.5-2x), maybe 90%-cropped / mirrored / recoloured (each with
    probability 1/2) copy of an encoded photo."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if rng.random() < 0.5:
        w, h = image.size
        cw, ch = round(0.9 * w), round(0.9 * h)
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = image.crop((x0, y0, x0 + cw, y0 + ch))
    scale = rng.uniform(0.5, 2.0)
    image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.BICUBIC)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if rng.random() < 0.5:
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.8, 1.2))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=rng.randint(30, 90))
    return buf.getvalue()
