"""Map-style image datasets over every input layout dinoforge accepts, with decode errors counted, never fatal.

`build_dataset(spec)` understands:
  - a directory of class subfolders (ImageFolder; label = sorted class index),
  - a flat directory of images, unlabelled (-1), where labels are not required (pretraining),
  - a file list (`path [label]` per line, see `dinoforge.data.file_list`),
  - a `.tar` shard, a brace pattern `dir/shard-{000000..000009}.tar`, a directory of `*.tar` shards, or a `curate`
    run directory / shard folder with `shards/index.json` (WebDataset layout, read by random access),
and an optional `imagefolder:`, `images:`, `filelist:` or `wds:` prefix forces the kind (detection:
`dinoforge.data.dataset_spec`).
Every sample is decoded by `dinoforge.data.decode` under one `DecodePolicy` (the default: as curation decodes it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from torch.utils.data import Dataset

from dinoforge.data.dataset_spec import detect_kind, shard_paths, split_kind_prefix
from dinoforge.data.decode import DEFAULT_POLICY, DecodePolicy, ImageDecodeError, decode_image, log_decoder
from dinoforge.data.error_counter import DecodeErrorCounter
from dinoforge.data.errors import DatasetError
from dinoforge.data.file_sources import FileListSource, FlatFolderSource, ImageFolderSource
from dinoforge.data.tar_shards import TarShardSource

logger = logging.getLogger(__name__)

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
        max_pixels: int | None = None,
        policy: DecodePolicy = DEFAULT_POLICY,
    ) -> None:
        self.source = source
        self.transform = transform
        self.with_labels = with_labels
        self.policy = policy if max_pixels is None else replace(policy, max_pixels=max_pixels)
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
                image = decode_image(self.source.read(current), self.policy)
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
    max_pixels: int | None = None,
    policy: DecodePolicy = DEFAULT_POLICY,
    labels_required: bool = True,
) -> ImageDataset:
    """The map-style dataset described by `spec` (see the module docstring for the accepted layouts); a flat image
    folder is taken only without `labels_required`."""
    source = build_source(spec, labels_required)
    logger.info("dataset: %s", source.describe())
    log_decoder()  # here, before data workers fork, so that the run logs it once
    return ImageDataset(source, transform, with_labels, max_pixels, policy)


def build_source(spec: str | Path, labels_required: bool = True) -> ImageSource:
    """The `ImageSource` for `spec`, detecting its kind unless a `kind:` prefix forces it."""
    kind, path = split_kind_prefix(str(spec))
    if kind is None:
        kind = detect_kind(path, labels_required)
    if kind == "imagefolder":
        return ImageFolderSource(path)
    if kind == "images":
        return FlatFolderSource(path)
    if kind == "filelist":
        return FileListSource(path)
    return TarShardSource(shard_paths(path), root=path)
