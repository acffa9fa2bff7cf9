"""Test inputs for the pretrain.data tests: real JPEGs from the shared Imagenette archive, shards, broken files.

Real images are extracted once into a cache directory (never into the repository); a test that needs them is
skipped with a message when the archive is absent. Broken files are synthesised here. This module holds helpers
only (no tests); the test files import it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(os.environ.get("DINOFORGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CACHE = Path(os.environ.get("DINOFORGE_CACHE", "~/.cache/dinoforge")).expanduser() / "test-data"
IMAGENETTE = SHARED_DATA / "imagenette2-224.tar"


def imagenette_subset(per_class: int = 8, split: str = "val") -> Path:
    """An ImageFolder root with the first `per_class` images of each Imagenette class (cached across runs)."""
    target = CACHE / f"imagenette-{split}-{per_class}"
    if target.is_dir():
        return target
    if not IMAGENETTE.is_file():
        pytest.skip(f"real test images not available: {IMAGENETTE} (set DINOFORGE_SHARED_DATA)")
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=CACHE, prefix=".staging-"))
    counts: Counter[str] = Counter()
    with tarfile.open(IMAGENETTE) as tar:
        for member in tar:
            parts = member.name.split("/")  # imagenette2-224/<split>/<wnid>/<file>
            if len(parts) != 4 or parts[1] != split or not member.isfile() or counts[parts[2]] >= per_class:
                continue
            counts[parts[2]] += 1
            (staging / parts[2]).mkdir(exist_ok=True)
            (staging / parts[2] / parts[3]).write_bytes(tar.extractfile(member).read())
            if len(counts) == 10 and min(counts.values()) >= per_class:
                break
    try:
        staging.rename(target)  # atomic: a concurrent run either wins or finds the finished folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def image_files(root: Path) -> list[Path]:
    """Image files of an ImageFolder root in the dataset's order (sorted class, then sorted file)."""
    return sorted(p for p in root.rglob("*") if p.suffix.upper() == ".JPEG")


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A synthetic noisy RGB JPEG (so truncation really cuts pixel data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries almost no pixel data (a decompression-bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def broken_images() -> dict[str, bytes]:
    """Named kinds of undecodable image files."""
    good = jpeg_bytes()
    return {
        "truncated": good[: len(good) // 2],
        "zero_bytes": b"",
        "text": b"this is a text file, not a JPEG\n",
        "bomb": png_header_only(20_000, 20_000),  # 400 MP: over PIL's own hard limit too
        "big": png_header_only(12_000, 12_000),  # 144 MP: over our default limit, under PIL's
    }


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with the given (member name, bytes) in order; names are written as given (even unsafe ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(
    folder: Path, samples: list[tuple[str, bytes, int | None]], per_shard: int, prefix: str = "shard"
) -> list[Path]:
    """WebDataset shards `prefix-%06d.tar` of (key, jpeg bytes, label) samples: `<key>.jpg` + `<key>.json`."""
    shards = []
    for start in range(0, len(samples), per_shard):
        members = []
        for key, data, label in samples[start : start + per_shard]:
            members.append((f"{key}.jpg", data))
            meta = {"uid": key} if label is None else {"uid": key, "label": label}
            members.append((f"{key}.json", json.dumps(meta).encode()))
        shards.append(write_tar(folder / f"{prefix}-{len(shards):06d}.tar", members))
    return shards


def imagefolder_samples(root: Path) -> list[tuple[str, bytes, int]]:
    """(key, bytes, label) of an ImageFolder tree, in dataset order, keyed by file stem."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(p.stem, p.read_bytes(), classes.index(p.parent.name)) for p in image_files(root)]
