"""Map-style image datasets over every input layout dinoforge accepts, with decode errors counted, never fatal.

`build_dataset(spec)` understands:
  - a directory of class subfolders (ImageFolder; label = sorted class index),
  - a `.txt`/`.csv` file list (`path [label]` per line),
  - a `.tar` shard, a brace pattern `dir/shard-{000000..000009}.tar`, a directory of `*.tar` shards, or a `curate`
    run directory / shard folder with `shards/index.json` (WebDataset layout, read by random access),
and an optional `imagefolder:`, `filelist:` or `wds:` prefix forces the kind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from torch.utils.data import Dataset
from webdataset.shardlists import expand_urls

from dinoforge.data.decode import DEFAULT_MAX_PIXELS, DecodeErrorCounter, ImageDecodeError, decode_image
from dinoforge.data.errors import DatasetError
from dinoforge.data.file_sources import IMAGE_SUFFIXES, FileListSource, ImageFolderSource
from dinoforge.data.tar_shards import TarShardSource

logger = logging.getLogger(__name__)

KIND_PREFIXES = ("imagefolder", "filelist", "wds")
FILE_LIST_SUFFIXES = (".txt", ".csv")
# How far `ImageDataset` looks for a readable replacement before concluding the dataset is broken.
MAX_CONSECUTIVE_ERRORS = 1000


class ImageSource(Protocol):
    """What `ImageDataset` needs from a layout: sample count, raw bytes, label, a name for messages."""

    kind: str
    root: str
    classes: list[str] | None
    rejected: list[tuple[str, str]]

    def __len__(self) -> int: ...
    def name(self, index: int) -> str: ...
    def read(self, index: int) -> bytes: ...
    def label(self, index: int) -> int: ...
    def describe(self) -> str: ...


class ImageDataset(Dataset):
    """Decoded images of an `ImageSource`: `ds[i]` -> `(image, label)` or `image` (`with_labels=False`).

    An unreadable sample (decode error, missing file, bad label member) is replaced by the next readable index
    (i+1, i+2, ... wrapping around), so batch shapes and the data order stay deterministic; each failure is
    logged with the file and reason and counted in `decode_errors`, which DataLoader workers share.
    """

    def __init__(
        self,
        source: ImageSource,
        transform: Callable[[Image.Image], Any] | None = None,
        with_labels: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.source = source
        self.transform = transform
        self.with_labels = with_labels
        self.max_pixels = max_pixels
        self._errors = DecodeErrorCounter()

    @property
    def classes(self) -> list[str] | None:
        return self.source.classes

    @property
    def decode_errors(self) -> int:
        """Unreadable samples met so far, by this process and its DataLoader workers."""
        return self._errors.value

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        image, label, _ = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return (image, label) if self.with_labels else image

    def load(self, index: int) -> tuple[Image.Image, int, int]:
        """(RGB image, label, number of unreadable samples skipped to find it) for sample `index`."""
        n = len(self.source)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index %= n
        first_failure = ""
        for skipped in range(min(n, MAX_CONSECUTIVE_ERRORS)):
            current = (index + skipped) % n
            try:
                image = decode_image(self.source.read(current), self.max_pixels)
                label = self.source.label(current) if self.with_labels else -1
            except (ImageDecodeError, OSError) as err:
                reason = err.reason if isinstance(err, ImageDecodeError) else f"cannot read file: {err}"
                self._errors.add()
                logger.warning("skipping unreadable sample %d (%s): %s", current, self.source.name(current), reason)
                first_failure = first_failure or f"{self.source.name(current)} ({reason})"
                continue
            return image, label, skipped
        raise DatasetError(
            f"{self.source.root}: {min(n, MAX_CONSECUTIVE_ERRORS)} consecutive samples from index {index} are "
            f"unreadable, the first: {first_failure}; check the dataset path and the logged reasons"
        )

    def describe(self) -> str:
        errors = f"; {self.decode_errors} unreadable sample(s) skipped so far" if self.decode_errors else ""
        return f"{self.source.describe()}{errors}"

    def __repr__(self) -> str:
        return f"ImageDataset({self.describe()})"


def build_dataset(
    spec: str | Path,
    transform: Callable[[Image.Image], Any] | None = None,
    with_labels: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageDataset:
    """The map-style dataset described by `spec` (see the module docstring for the accepted layouts)."""
    source = build_source(spec)
    logger.info("dataset: %s", source.describe())
    return ImageDataset(source, transform=transform, with_labels=with_labels, max_pixels=max_pixels)


def build_source(spec: str | Path) -> ImageSource:
    """The `ImageSource` for `spec`, detecting its kind unless a `kind:` prefix forces it."""
    kind, path = split_kind_prefix(str(spec))
    if kind is None:
        kind = detect_kind(path)
    if kind == "imagefolder":
        return ImageFolderSource(path)
    if kind == "filelist":
        return FileListSource(path)
    return TarShardSource(shard_paths(path), root=path)


def split_kind_prefix(spec: str) -> tuple[str | None, str]:
    """`"wds:/data/x"` -> ("wds", "/data/x"); no known prefix -> (None, spec)."""
    head, sep, rest = spec.partition(":")
    if sep and head in KIND_PREFIXES:
        return head, rest
    return None, spec


def detect_kind(path: str) -> str:
    """"imagefolder", "filelist" or "wds" for a dataset path, or a `DatasetError` saying what was expected."""
    if "{" in path and ".." in path:
        return "wds"
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".tar":
            return "wds"
        if p.suffix.lower() in FILE_LIST_SUFFIXES:
            return "filelist"
        if p.name == "index.json":
            return "wds"
        raise DatasetError(
            f"{path}: not a dataset file: expected a .tar shard, a .txt/.csv file list or a shards/index.json (or "
            "force the kind with a 'filelist:' or 'wds:' prefix)"
        )
    if not p.is_dir():
        raise FileNotFoundError(f"dataset path does not exist: {path}")
    if (p / "shards" / "index.json").is_file() or (p / "index.json").is_file():
        return "wds"
    has_tars = any(p.glob("*.tar"))
    has_dirs = any(e.is_dir() and not e.name.startswith(".") for e in p.iterdir())
    if has_tars and has_dirs:
        raise DatasetError(
            f"{path}: holds both .tar files and subfolders; say which one you mean with a 'wds:' or 'imagefolder:' "
            "prefix"
        )
    if has_tars:
        return "wds"
    if has_dirs:
        return "imagefolder"
    images = sum(1 for e in p.iterdir() if e.suffix.lower() in IMAGE_SUFFIXES)
    if images:
        # The common mistake: pointing at a flat folder of photos, which has no labels to number.
        raise DatasetError(
            f"{path}: holds {images} image file(s) but no class subfolders; expected an ImageFolder layout "
            f"{path}/<class>/<image> (move the images into a class folder), or list them in a .txt file and use "
            "it with a 'filelist:' prefix"
        )
    raise DatasetError(f"{path}: empty dataset directory (no class subfolders, no .tar shards, no images)")


def shard_paths(path: str) -> list[str]:
    """The tar shards named by a brace pattern, a `.tar` file, an `index.json`, or a directory of shards."""
    if "{" in path:
        paths = expand_urls(path)
        missing = [s for s in paths if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: {len(missing)} of {len(paths)} shards do not exist, e.g. {missing[0]}")
        return paths
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".tar":
        return [str(p)]
    index = p if p.name == "index.json" else p / "shards" / "index.json"
    if not index.is_file():
        index = p / "index.json"
    if index.is_file():
        return shards_from_index(index)
    if p.is_dir():
        paths = sorted(str(s) for s in p.glob("*.tar"))
        if paths:
            return paths
    raise FileNotFoundError(f"{path}: no .tar shards found (expected *.tar files or a shards/index.json)")


def shards_from_index(index: Path) -> list[str]:
    """Shard paths listed in a `curate` `shards/index.json`, resolved against its folder.

    Accepted layouts: a list, or a mapping with a "shards" list, of names or of objects with a "path", "name",
    "file" or "url" field. An index without a shard list falls back to the folder's `*.tar` files.
    """
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{index}: unreadable shard index ({err})") from None
    entries = data.get("shards") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        paths = sorted(str(s) for s in index.parent.glob("*.tar"))
        if not paths:
            raise DatasetError(f"{index}: no 'shards' list and no .tar files beside it")
        return paths
    paths = []
    for i, entry in enumerate(entries):
        name = entry if isinstance(entry, str) else next(
            (entry[k] for k in ("path", "name", "file", "url") if isinstance(entry, dict) and k in entry), None
        )
        if not isinstance(name, str):
            raise DatasetError(f"{index}: shard entry {i} has no path/name/file/url string: {entry!r}")
        # Names are relative to the index's folder, or to the run directory above it ("shards/curated-0.tar").
        candidates = [Path(name)] if Path(name).is_absolute() else [index.parent / name, index.parent.parent / name]
        shard = next((c for c in candidates if c.is_file()), None)
        if shard is None:
            raise FileNotFoundError(f"{index}: listed shard {name!r} does not exist at {candidates[0]}")
        paths.append(str(shard))
    if not paths:
        raise DatasetError(f"{index}: the shard index lists no shards")
    return paths
