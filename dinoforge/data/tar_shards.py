"""Random access into WebDataset tar shards: scan the headers once, then read any sample by seeking.

Streaming readers see a shard only in order; evaluation and exact-resume training need sample `i` on demand. A
shard is scanned once (tar headers only, the data is skipped by seeking) by the shared member loop and key grouper
(`dinoforge.data.tar_reader`, `dinoforge.data.tar_samples`: safe names, regular files only, WebDataset keys). A
rejected member or sample is recorded with its reason, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dinoforge.data.decode import ImageDecodeError
from dinoforge.data.errors import DatasetError
from dinoforge.data.tar_reader import TarDamage, iter_tar_members, read_span
from dinoforge.data.tar_samples import StrayMember, TarSample, group_samples

logger = logging.getLogger(__name__)


@dataclass
class ShardScan:
    """The samples of one shard: parallel lists of keys and (offset, size) of their image and label members."""

    path: str
    keys: list[str] = field(default_factory=list)
    image_ext: list[str] = field(default_factory=list)
    image_span: list[tuple[int, int]] = field(default_factory=list)
    label_ext: list[str] = field(default_factory=list)  # "" when the sample has no label member
    label_span: list[tuple[int, int]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (shard:member, reason)


def scan_shard(path: str | Path) -> ShardScan:
    """Scan the headers of the tar at `path` into a `ShardScan`; raise `OSError` if it cannot be opened or is
    compressed (a compressed tar has no offsets to seek to)."""
    scan = ShardScan(str(path))
    for item in group_samples(iter_tar_members(path, read_data=False)):
        if isinstance(item, TarDamage):
            if not item.opened:
                raise OSError(item.reason)
            # Members before the damage stay usable; a member whose data is cut short fails when read, per sample.
            scan.rejected.append((scan.path, item.reason))
        elif isinstance(item, StrayMember):
            scan.rejected.append((f"{path}:{item.member.name}", item.reason))
        else:
            _add_sample(scan, item)
    return scan


def _add_sample(scan: ShardScan, sample: TarSample) -> None:
    """Add `sample` to `scan`, or record its rejected members (or, with none, why it has no image)."""
    if any(m.offset is None for m in sample.members.values()):
        raise OSError(f"{scan.path} is a compressed tar: random access needs an uncompressed one")
    rejected = [m for m in sample.members.values() if m.reject_reason]
    scan.rejected += [(f"{scan.path}:{m.name}", m.reject_reason) for m in rejected]
    image_ext = sample.image_ext()
    if image_ext is None:
        if not rejected:
            scan.rejected.append((f"{scan.path}:{sample.key}", sample.reject_reason()))
        return
    usable = sample.usable()
    label_ext = sample.label_ext() or ""
    scan.keys.append(sample.key)
    scan.image_ext.append(image_ext)
    scan.image_span.append((usable[image_ext].offset, usable[image_ext].size))
    scan.label_ext.append(label_ext)
    scan.label_span.append((usable[label_ext].offset, usable[label_ext].size) if label_ext else (0, 0))


def _read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        return read_span(f, offset, size)


def parse_label(data: bytes, ext: str) -> int:
    """The integer class label in a `.json` (key "label") or `.cls` member; -1 when there is none."""
    text = data.decode("utf-8", errors="replace").strip()
    if ext == "cls":
        return int(text)
    meta = json.loads(text) if text else {}
    value = meta.get("label", -1) if isinstance(meta, dict) else -1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'label' must be an integer class index, got {value!r}")
    return value


class TarShardSource:
    """Random-access samples of WebDataset tar shards (also `curate` output shards)."""

    kind = "webdataset"
    classes: list[str] | None = None

    def __init__(self, shard_paths: Sequence[str | Path], root: str | None = None) -> None:
        if not shard_paths:
            raise DatasetError(f"no tar shards given{f' under {root}' if root else ''}")
        self.root = root or str(shard_paths[0])
        self.shards: list[str] = []
        self.keys: list[str] = []
        self.rejected: list[tuple[str, str]] = []
        shard_of, image_span, label_span, image_ext, label_ext = [], [], [], [], []
        for path in tqdm(shard_paths, desc="scanning tar shards", unit="shard", disable=len(shard_paths) < 8):
            path = str(path)
            if not Path(path).is_file():
                raise FileNotFoundError(f"tar shard not found: {path}")
            try:
                scan = scan_shard(path)
            except OSError as err:
                raise DatasetError(f"{path}: not a readable tar archive ({err}); remove it from the dataset") from None
            shard_id = len(self.shards)
            self.shards.append(path)
            self.keys += scan.keys
            shard_of += [shard_id] * len(scan.keys)
            image_span += scan.image_span
            label_span += scan.label_span
            image_ext += scan.image_ext
            label_ext += scan.label_ext
            self.rejected += scan.rejected
        # Offsets live in numpy arrays: millions of samples cost tens of MB instead of Python-object overhead.
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._image_span = np.asarray(image_span, dtype=np.int64).reshape(-1, 2)
        self._label_span = np.asarray(label_span, dtype=np.int64).reshape(-1, 2)
        self._image_ext = image_ext
        self._label_ext = label_ext
        for where, reason in self.rejected:
            logger.warning("skipped tar member %s: %s", where, reason)

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, index: int) -> str:
        return f"{self.shards[self._shard_of[index]]}:{self.keys[index]}.{self._image_ext[index]}"

    def read(self, index: int) -> bytes:
        offset, size = self._image_span[index]
        return _read_at(self.shards[self._shard_of[index]], int(offset), int(size))

    def label(self, index: int) -> int:
        ext = self._label_ext[index]
        if not ext:
            return -1
        offset, size = self._label_span[index]
        shard = self.shards[self._shard_of[index]]
        data = _read_at(shard, int(offset), int(size))
        try:
            return parse_label(data, ext)
        except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
            raise ImageDecodeError(f"bad label member .{ext}: {err}") from None

    def describe(self) -> str:
        return (
            f"WebDataset shards at {self.root}: {len(self)} samples in {len(self.shards)} shard(s)"
            f"{f', {len(self.rejected)} member(s) rejected' if self.rejected else ''}"
        )
