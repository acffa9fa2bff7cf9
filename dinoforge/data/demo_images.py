"""The demo dataset: ten procedural image classes the project draws itself (numpy + PIL, no download), with an
uncurated pool in which curation has planted work to find, and labelled splits for k-NN evaluation.

`write_demo_images(out)` (or `python -m dinoforge.data.demo_images OUT`) writes
  - `pool/NN/img_NNNNN.{jpg,png}`: the uncurated pool, file names in a shuffled order that says nothing of the
    content; besides the clean images it holds exact copies (the same bytes under another name), near-duplicates
    (cropped, resized, re-encoded at a lower JPEG quality), corrupt files (truncated JPEGs, random bytes named .jpg,
    a 3-byte JPEG start, an empty file), images smaller than curation's 16 px minimum, and exact copies of `val`
    images (what decontamination must remove);
  - `train/<class>/` and `val/<class>/`: labelled ImageFolder splits, drawn with other seeds than the pool;
  - `MANIFEST.json`: the arguments, counts and every planted file (paths relative to `out`), and the class of every
    pool image that has one;
  - `COMPLETE.json`: the arguments and generator version, so a second call with the same ones writes nothing.

Classes are shapes and textures; colour says nothing of the class: the foreground and background colours of every
image are drawn from one distribution for all classes (any hue, saturation and brightness, with a brightness gap so
the pattern shows in grey), and which of the two is brighter is a coin flip. Within a class, scale, rotation,
position or phase, line width, background shading, noise and blur vary image to image, so a model must learn the
pattern and not memorise pictures.

Every image has its own generator seeded by (seed, split, class, index): an image does not change when the counts
do, and the same arguments give byte-identical files (PIL's encoders with fixed settings; identical at least with
the same PIL, libjpeg and zlib builds). The dataset is written into a hidden sibling folder and renamed onto `out`
when complete, so an interrupted run leaves no half dataset at `out`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dinoforge.atomic import atomic_write_json

# Bump when any image changes for the same arguments: a dataset written by another version is rewritten.
GENERATOR_VERSION = 1
CLASSES = ("stripes", "checkerboard", "rings", "dots", "crosses", "triangles", "waves", "grid", "blobs", "gradient")
MANIFEST_NAME = "MANIFEST.json"
MARKER_NAME = "COMPLETE.json"
# 250 images a class at 64 px (2,500 per split, written in about 10 s on 2 cores): the cpu_tiny recipe (48 px global
# crops, 32 images a step, ~0.4 s a step on 2 cores with these files) sees the train split about 4 times in a 300-step
# probe (3 minutes); 64 px leaves its random resized crops room to downscale instead of upscaling. 40 val images a
# class: 400 in all, so one image moves k-NN accuracy by 0.25%.
DEFAULT_PER_CLASS = 250
DEFAULT_VAL_PER_CLASS = 40
DEFAULT_SIZE = 64
MIN_SIZE = 32  # below this the patterns' finest lines (about 1 px at 64 px) vanish
JPEG_QUALITY = 90  # every clean image; near-duplicates are re-encoded lower (NEAR_QUALITY)
NEAR_QUALITY = (60, 80)
PNG_EVERY = 10  # one clean pool / train / val image in ten is a PNG: the pool mixes formats as real ones do
SPLIT_IDS = {"pool": 0, "train": 1, "val": 2, "plant": 3}
POOL_FOLDER_SIZE = 500  # pool files per sub-folder (pool/00, pool/01, ...): a nested pool, as crawls are
CORRUPT_KINDS = ("truncated_jpeg", "truncated_jpeg", "random_bytes", "random_bytes", "three_bytes", "empty")
TINY_SIZES = ((12, 12), (10, 14))  # below curation's ingest.limits.min_side (16)


# -- patterns: a map m in [0, 1] (1: foreground) from pixel coordinates, with anti-aliased edges -----------------------

def _soft(signed_distance: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Coverage of a shape from its signed distance in pixels (negative inside), with a `width`-pixel ramp."""
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0)


def _band_distance(x: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Distance in pixels from x to the nearest centre of bands repeating every `period` pixels."""
    return np.abs(np.mod(x / period + phase, 1.0) - 0.5) * period


def _rotate(u: np.ndarray, v: np.ndarray, angle: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * u - s * v, s * u + c * v


def _stripes(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    period = rng.uniform(6, 14) * k
    half = period * rng.uniform(0.2, 0.3)
    return _soft(_band_distance(u, period, rng.random()) - half)


def _checkerboard(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    period = rng.uniform(10, 24) * k  # one light and one dark square
    a = _soft(_band_distance(u, period, rng.random()) - period / 4)
    b = _soft(_band_distance(v, period, rng.random()) - period / 4)
    return a + b - 2 * a * b  # soft exclusive or


def _rings(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    extent = u.shape[0] / 2
    cx, cy = rng.uniform(-0.6, 0.6, size=2) * extent
    period = rng.uniform(6, 13) * k
    half = period * rng.uniform(0.2, 0.3)
    return _soft(_band_distance(np.hypot(u - cx, v - cy), period, rng.random()) - half)


def _waves(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    period = rng.uniform(6, 12) * k
    wavelength = rng.uniform(14, 28) * k
    amplitude = rng.uniform(0.5, 0.9) * period
    phase = rng.uniform(0, 2 * math.pi)
    shifted = u + amplitude * np.sin(2 * math.pi * v / wavelength + phase)
    # The band distance is measured along u; divide by the slope's stretch to keep the edges one pixel wide.
    slope = amplitude * 2 * math.pi / wavelength * np.cos(2 * math.pi * v / wavelength + phase)
    half = period * rng.uniform(0.2, 0.3)
    return _soft((_band_distance(shifted, period, rng.random()) - half) / np.sqrt(1 + slope ** 2))


def _grid(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    period = rng.uniform(9, 18) * k
    half = rng.uniform(0.6, 1.4) * k
    return np.maximum(_soft(_band_distance(u, period, rng.random()) - half),
                      _soft(_band_distance(v, period, rng.random()) - half))


def _cells(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, cell: float, per_cell: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Local coordinates (pixels from the cell centre) in a lattice of `cell`-pixel cells, a random draw of
    `per_cell` numbers in [0, 1) for every cell, and whether each cell is shown (a few stay empty)."""
    gu, gv = u / cell + rng.random(), v / cell + rng.random()
    fu, fv = np.floor(gu), np.floor(gv)
    iu, iv = (fu - fu.min()).astype(np.int64), (fv - fv.min()).astype(np.int64)
    params = rng.random((iu.max() + 1, iv.max() + 1, per_cell + 1))[iu, iv]
    shown = params[..., -1] >= rng.uniform(0.0, 0.2)
    return (gu - fu - 0.5) * cell, (gv - fv - 0.5) * cell, params[..., :-1], shown


def _dots(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    cell = rng.uniform(9, 16) * k
    x, y, p, shown = _cells(rng, u, v, cell, 3)
    radius = cell * (0.18 + 0.14 * p[..., 0])
    jitter = cell * 0.5 - radius - 0.5
    dx, dy = x - (2 * p[..., 1] - 1) * jitter * 0.6, y - (2 * p[..., 2] - 1) * jitter * 0.6
    return _soft(np.hypot(dx, dy) - radius) * shown


def _crosses(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    cell = rng.uniform(12, 20) * k
    x, y, p, shown = _cells(rng, u, v, cell, 3)
    arm = cell * (0.3 + 0.12 * p[..., 0])
    half_width = np.maximum(cell * (0.06 + 0.05 * p[..., 1]), 0.7)
    x, y = _rotate(x, y, (p[..., 2] - 0.5) * 0.6)  # each cross turned a little on top of the image's rotation
    ax, ay = np.abs(x), np.abs(y)
    bar_a = np.maximum(ax - arm, ay - half_width)
    bar_b = np.maximum(ay - arm, ax - half_width)
    return _soft(np.minimum(bar_a, bar_b)) * shown


def _triangles(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    cell = rng.uniform(12, 20) * k
    x, y, p, shown = _cells(rng, u, v, cell, 2)
    inradius = cell * (0.13 + 0.07 * p[..., 0])
    angle = p[..., 1] * 2 * math.pi / 3  # a triangle's orientation repeats every 120 degrees
    distance = np.full(x.shape, -np.inf)
    for edge in range(3):
        normal = angle + edge * 2 * math.pi / 3
        distance = np.maximum(distance, x * np.cos(normal) + y * np.sin(normal) - inradius)
    return _soft(distance) * shown


def _blobs(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    size = u.shape[0]
    coarse = int(rng.integers(3, 8))
    noise = Image.fromarray(rng.standard_normal((coarse, coarse)).astype(np.float32), mode="F")
    field = np.asarray(noise.resize((size, size), Image.BICUBIC), dtype=np.float64)
    field = (field - field.mean()) / max(field.std(), 1e-6)
    threshold = rng.uniform(-0.4, 0.4)
    gy, gx = np.gradient(field)
    # The field divided by its gradient approximates the distance to the blob outline in pixels.
    return _soft((threshold - field) / np.maximum(np.hypot(gx, gy), 1e-3))


def _gradient(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, k: float) -> np.ndarray:
    extent = u.shape[0]
    if rng.random() < 0.6:  # linear ramp (u is already rotated at random)
        ramp = u / extent * rng.uniform(0.9, 1.4) + 0.5 + rng.uniform(-0.15, 0.15)
    else:  # radial ramp from an off-centre point
        cx, cy = rng.uniform(-0.5, 0.5, size=2) * extent
        ramp = np.hypot(u - cx, v - cy) / (extent * rng.uniform(0.6, 1.0))
    ramp = np.clip(ramp, 0.0, 1.0)
    return ramp ** rng.uniform(0.6, 1.6)


PATTERNS: dict[str, Callable[[np.random.Generator, np.ndarray, np.ndarray, float], np.ndarray]] = {
    "stripes": _stripes, "checkerboard": _checkerboard, "rings": _rings, "dots": _dots, "crosses": _crosses,
    "triangles": _triangles, "waves": _waves, "grid": _grid, "blobs": _blobs, "gradient": _gradient,
}


# -- one image ---------------------------------------------------------------------------------------------------------

def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """Any hue, saturation and brightness: the same distribution for every class."""
    hue, saturation, value = rng.random(), rng.random() ** 0.7, rng.uniform(0.1, 1.0)
    sector = hue * 6
    f = sector - math.floor(sector)
    p, q, t = value * (1 - saturation), value * (1 - saturation * f), value * (1 - saturation * (1 - f))
    rgb = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][int(sector) % 6]
    return np.array(rgb)


def _colours(rng: np.random.Generator, min_gap: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background, foreground and a second foreground colour (equal to the first in most images), each foreground
    at least `min_gap` away from the background in luminance so the pattern survives a greyscale conversion."""
    while True:
        background, foreground = _random_colour(rng), _random_colour(rng)
        if abs(_luminance(background) - _luminance(foreground)) >= min_gap:
            break
    second = foreground
    if rng.random() < 0.3:  # a two-colour foreground, blended across the image
        side = _luminance(foreground) > _luminance(background)
        for _ in range(20):
            candidate = _random_colour(rng)
            gap = _luminance(candidate) - _luminance(background)
            if abs(gap) >= min_gap and (gap > 0) == side:  # on the same side of the background as the first
                second = candidate
                break
    return background, foreground, second


def render(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One `size` x `size` RGB image (uint8) of class `name`, every choice drawn from `rng`."""
    k = size / DEFAULT_SIZE  # pattern sizes are given in pixels at 64 px
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5 - size / 2
    u, v = _rotate(x, y, rng.uniform(0, 2 * math.pi))
    mask = PATTERNS[name](rng, u, v, k)[..., None]
    background, foreground, second = _colours(rng)
    # A soft linear shading across the background and the blend between the foreground colours, in random directions.
    su, _ = _rotate(x, y, rng.uniform(0, 2 * math.pi))
    shade = 1 + rng.uniform(0, 0.25) * (su / size)[..., None]
    bu, _ = _rotate(x, y, rng.uniform(0, 2 * math.pi))
    blend = np.clip(bu / size + 0.5, 0, 1)[..., None]
    fore = foreground * (1 - blend) + second * blend
    pixels = np.clip((background * shade) * (1 - mask) + fore * mask, 0, 1)
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9) * k))
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, rng.uniform(0, 0.05) * 255, size=(size, size, 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray | Image.Image, ext: str, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG (4:4:4 chroma: the patterns' colours are per pixel) or PNG bytes with fixed encoder settings (no metadata,
    no optimisation pass): the same pixels always give the same bytes."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    if ext == "jpg":
        image.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    elif ext == "png":
        image.save(buf, format="PNG", compress_level=6, optimize=False)
    else:
        raise ValueError(f"encode: unknown extension {ext!r} (jpg or png)")
    return buf.getvalue()


def _image(split: str, label: int, index: int, size: int, seed: int) -> tuple[bytes, str]:
    """The encoded bytes and extension of image `index` of class `label` in `split`."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], label, index])
    ext = "png" if index % PNG_EVERY == PNG_EVERY - 1 else "jpg"
    return encode(render(CLASSES[label], rng, size), ext), ext


# -- the planted pool --------------------------------------------------------------------------------------------------

def _near_duplicate(data: bytes, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A cropped (97-100% of each side), resized (0.85-1.2x) copy re-encoded at a lower JPEG quality, and how it was
    made (so a test can redo the geometry and compare pixels).

    Mild on purpose: curation's weight-free copy detector (curate.embedding.copydetect, cosine 0.8) sees these small
    periodic patterns change more under a crop or a re-encoding than photos. Of the 50 copies of the default dataset,
    crops of 90-97% with 4:2:0 chroma at quality 55-80 put 10 below 0.8; 97-100% crops with 4:2:0 still 2 (seed 2);
    these settings none (the lowest cosine is 0.84-0.88 on seeds 0-2)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    cw, ch = (round(side * rng.uniform(0.97, 1.0)) for side in (width, height))
    x0, y0 = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
    scale = rng.uniform(0.85, 1.2)
    new_size = (max(16, round(cw * scale)), max(16, round(ch * scale)))
    quality = int(rng.integers(NEAR_QUALITY[0], NEAR_QUALITY[1] + 1))
    copy = image.crop((x0, y0, x0 + cw, y0 + ch)).resize(new_size, Image.BICUBIC)
    return encode(copy, "jpg", quality=quality), {
        "crop": [x0, y0, x0 + cw, y0 + ch], "size": list(new_size), "quality": quality}


def _corrupt(kind: str, rng: np.random.Generator, size: int) -> bytes:
    if kind == "truncated_jpeg":  # a real JPEG cut inside its scan data: the header reads, the pixels do not
        data = encode(render(CLASSES[int(rng.integers(len(CLASSES)))], rng, size), "jpg")
        return data[: int(len(data) * rng.uniform(0.4, 0.7))]
    if kind == "random_bytes":  # no image format's signature starts with a zero byte
        return b"\x00" + rng.bytes(int(rng.integers(500, 3000)))
    if kind == "three_bytes":
        return b"\xff\xd8\xff"  # the start of a JPEG and nothing else
    if kind == "empty":
        return b""
    raise ValueError(f"unknown corrupt kind {kind!r}")


def _pool_entries(per_class: int, val_files: list[tuple[str, bytes]], size: int, seed: int
                  ) -> list[tuple[bytes, str, dict]]:
    """Every pool file as (bytes, extension, record); a record's `kind` says what it is, `of` the index of the clean
    entry it copies and `val` the val file it copies."""
    entries: list[tuple[bytes, str, dict]] = []
    for label in range(len(CLASSES)):
        for index in range(per_class):
            data, ext = _image("pool", label, index, size, seed)
            entries.append((data, ext, {"kind": "clean", "class": CLASSES[label]}))
    n_clean = len(entries)
    rng = np.random.default_rng([seed, SPLIT_IDS["plant"]])
    n_exact = n_near = max(1, n_clean // 50)
    originals = rng.choice(n_clean, size=n_exact + n_near, replace=False)
    for i in originals[:n_exact]:
        data, ext, record = entries[i]
        entries.append((data, ext, {"kind": "exact_copy", "class": record["class"], "of": int(i)}))
    for i in originals[n_exact:]:
        data, how = _near_duplicate(entries[i][0], rng)
        entries.append((data, "jpg", {"kind": "near_duplicate", "class": entries[i][2]["class"], "of": int(i), **how}))
    n_contaminants = max(1, len(val_files) // 20)
    for i in sorted(rng.choice(len(val_files), size=n_contaminants, replace=False)):
        name, data = val_files[i]
        entries.append((data, name.rsplit(".", 1)[-1], {"kind": "contaminant", "class": name.split("/")[1],
                                                        "val": name}))
    for kind in CORRUPT_KINDS:
        entries.append((_corrupt(kind, rng, size), "jpg", {"kind": "corrupt", "corrupt": kind}))
    for (width, height), ext in zip(TINY_SIZES, ("jpg", "png"), strict=True):
        label = int(rng.integers(len(CLASSES)))
        tiny = Image.fromarray(render(CLASSES[label], rng, size)).resize((width, height), Image.BICUBIC)
        entries.append((encode(tiny, ext), ext, {"kind": "tiny", "class": CLASSES[label], "size": [width, height]}))
    order = rng.permutation(len(entries))
    return _shuffled(entries, order)


def _shuffled(entries: list[tuple[bytes, str, dict]], order: np.ndarray) -> list[tuple[bytes, str, dict]]:
    """`entries` in `order`, with every `of` index renumbered to the copied entry's new position."""
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    result = []
    for i in order:
        data, ext, record = entries[i]
        if "of" in record:
            record = {**record, "of": int(position[record["of"]])}
        result.append((data, ext, record))
    return result


def _pool_name(index: int, ext: str) -> str:
    return f"pool/{index // POOL_FOLDER_SIZE:02d}/img_{index:05d}.{ext}"


def _manifest(entries: list[tuple[bytes, str, dict]], arguments: dict, n_train: int, n_val: int) -> dict:
    names = [_pool_name(i, ext) for i, (_, ext, _) in enumerate(entries)]
    planted: dict[str, list[dict]] = {"exact_copies": [], "near_duplicates": [], "contaminants": [], "corrupt": [],
                                      "tiny": []}
    for name, (_, _, record) in zip(names, entries, strict=True):
        kind = record["kind"]
        if kind == "exact_copy":
            planted["exact_copies"].append({"file": name, "original": names[record["of"]]})
        elif kind == "near_duplicate":
            planted["near_duplicates"].append({"file": name, "original": names[record["of"]], "crop": record["crop"],
                                               "size": record["size"], "quality": record["quality"]})
        elif kind == "contaminant":
            planted["contaminants"].append({"file": name, "val": record["val"]})
        elif kind == "corrupt":
            planted["corrupt"].append({"file": name, "kind": record["corrupt"]})
        elif kind == "tiny":
            planted["tiny"].append({"file": name, "size": record["size"]})
    counts = {"classes": len(CLASSES), "pool": len(entries),
              "pool_clean": sum(record["kind"] == "clean" for _, _, record in entries),
              **{kind: len(files) for kind, files in planted.items()}, "train": n_train, "val": n_val}
    return {
        "generator_version": GENERATOR_VERSION, "arguments": arguments, "classes": list(CLASSES), "counts": counts,
        # What curation should conclude. Ingest rejects exactly the corrupt and tiny files. Dedup marks one file of
        # each exact and near-duplicate pair, and decontamination the val copies, at least: procedural images of one
        # class are alike, so the copy detector (cosine 0.8) also pairs a few clean ones (8-12 of 2,500 clean pool
        # images with the default sizes, seeds 0-2) and may join a clean image to a val one (0-3).
        "expected": {"rejected": counts["corrupt"] + counts["tiny"],
                     "duplicate_at_least": counts["exact_copies"] + counts["near_duplicates"],
                     "contaminated_at_least": counts["contaminants"]},
        **planted,
        "pool_classes": {name: record["class"] for name, (_, _, record) in zip(names, entries, strict=True)
                         if "class" in record},
    }


# -- the dataset on disk -----------------------------------------------------------------------------------------------

def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_all(root: Path, arguments: dict) -> dict:
    per_class, val_per_class, size, seed = (arguments[k] for k in ("per_class", "val_per_class", "size", "seed"))
    n_train = 0
    for label, name in enumerate(CLASSES):
        for index in range(per_class):
            data, ext = _image("train", label, index, size, seed)
            _write_file(root / "train" / name / f"{name}_{index:04d}.{ext}", data)
            n_train += 1
    val_files = []
    for label, name in enumerate(CLASSES):
        for index in range(val_per_class):
            data, ext = _image("val", label, index, size, seed)
            val_files.append((f"val/{name}/{name}_{index:04d}.{ext}", data))
    for name, data in val_files:
        _write_file(root / name, data)
    entries = _pool_entries(per_class, val_files, size, seed)
    for i, (data, ext, _) in enumerate(entries):
        _write_file(root / _pool_name(i, ext), data)
    manifest = _manifest(entries, arguments, n_train, len(val_files))
    atomic_write_json(root / MANIFEST_NAME, manifest)
    atomic_write_json(root / MARKER_NAME, {"generator_version": GENERATOR_VERSION, "arguments": arguments})
    return manifest["counts"]


def is_complete(out: str | Path, arguments: dict) -> bool:
    """Whether `out` holds a complete dataset written by this generator version with these arguments."""
    try:
        marker = json.loads((Path(out) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"generator_version": GENERATOR_VERSION, "arguments": arguments}


def write_demo_images(out: str | Path, per_class: int = DEFAULT_PER_CLASS, val_per_class: int = DEFAULT_VAL_PER_CLASS,
                      size: int = DEFAULT_SIZE, seed: int = 0) -> dict:
    """Write the demo dataset to `out` (layout in the module docstring) and return its counts; when `out` already
    holds the dataset of these arguments, write nothing and return its counts.

    `out` may be missing, empty, or a demo dataset of other arguments (replaced); anything else is refused, so a
    mistyped path never deletes someone's data.
    """
    if per_class < 1 or val_per_class < 1:
        raise ValueError(f"per_class={per_class}, val_per_class={val_per_class}: both must be >= 1")
    if seed < 0:
        raise ValueError(f"seed={seed}: must be >= 0")
    if size < MIN_SIZE:
        raise ValueError(f"size={size}: must be >= {MIN_SIZE} (the finest lines vanish below)")
    out = Path(out)
    arguments = {"per_class": per_class, "val_per_class": val_per_class, "size": size, "seed": seed}
    if is_complete(out, arguments):
        return json.loads((out / MANIFEST_NAME).read_text())["counts"]
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MARKER_NAME).is_file())):
        raise FileExistsError(f"{out} exists and is not a demo dataset (no {MARKER_NAME}): choose a new or empty "
                              "folder; nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = _write_all(tmp, arguments)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dinoforge.data.demo_images",
        description="Write the demo dataset: a procedural 10-class image pool with planted duplicates, corrupt and "
                    "contaminating files, train/val ImageFolder splits and MANIFEST.json. No download.")
    parser.add_argument("out", help="folder to write (missing, empty, or an earlier demo dataset)")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                        help=f"clean pool images and train images per class (default {DEFAULT_PER_CLASS})")
    parser.add_argument("--val-per-class", type=int, default=DEFAULT_VAL_PER_CLASS,
                        help=f"val images per class (default {DEFAULT_VAL_PER_CLASS})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels (default {DEFAULT_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    arguments = {"per_class": args.per_class, "val_per_class": args.val_per_class, "size": args.size,
                 "seed": args.seed}
    reused = is_complete(args.out, arguments)
    try:
        counts = write_demo_images(args.out, **arguments)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = "already complete, nothing written" if reused else f"written in {time.perf_counter() - start:.1f}s"
    print(f"{args.out}: {what}: {json.dumps(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
