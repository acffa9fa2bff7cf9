"""Real photos for the curate tests: the shared Imagenette/Imagewoof tars, unpacked once into a user cache folder.

Never copies anything into the repository. Unpacking goes to a temporary folder renamed into place, so concurrent
test processes either see the complete tree or unpack their own.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CACHE_DIR = Path(os.environ.get("DINOFORGE_CACHE", Path.home() / ".cache" / "dinoforge"))
ARCHIVES = {"imagenette": "imagenette2-224", "imagewoof": "imagewoof2-112"}


def dataset_root(name: str) -> Path:
    """The unpacked tree of `imagenette` or `imagewoof` (skips the test when the shared data is absent)."""
    stem = ARCHIVES[name]
    target = CACHE_DIR / "data" / stem
    if (target / "train").is_dir():
        return target
    archive = DATA_DIR / f"{stem}.tar"
    if not archive.is_file():
        pytest.skip(f"shared test data {archive} is not available")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{stem}-"))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.replace(tmp / stem, target)
        except OSError:  # another process finished first
            if not (target / "train").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def photo_paths(name: str, split: str = "train", per_class: int = 10, offset: int = 0) -> list[Path]:
    """`per_class` photos of every class of `name`/`split`, in sorted order from `offset`."""
    root = dataset_root(name) / split
    paths: list[Path] = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        paths.extend(sorted(cls.iterdir())[offset:offset + per_class])
    return paths
