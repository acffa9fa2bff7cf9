"""Random access into WebDataset tar shards: scan the headers once, then read any sample by seeking.

Streaming readers see a shard only in order; evaluation and exact-resume training need sample `i` on demand. A
shard is scanned once (tar headers only, the data is skipped by seeking), each member is checked
(`dinoforge.data.tar_members`: safe names, regular files only) and grouped by WebDataset key (`dir/key.ext`, the
extension is everything after the first dot of the basename, lowercased, as webdataset does). A rejected member or
sample is recorded with its reason, never dropped silently.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dinoforge.data.decode import ImageDecodeError
from dinoforge.data.errors import DatasetError
from dinoforge.data.formats import image_member, label_member
from dinoforge.data.tar_members import is_webdataset_metadata, member_problem, split_key

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
    """Scan the headers of the tar at `path` into a `ShardScan`; raise `OSError`/`tarfile.TarError` if unreadable."""
    scan = ShardScan(str(path))
    members: dict[str, dict[str, tuple[int, int]]] = {}  # key -> ext -> (offset, size), in order of appearance
    with tarfile.open(path, mode="r:") as tar:
        for info in _members_until_damage(tar, scan):
            where = f"{path}:{info.name}"
            if info.isdir():
                continue
            reason = member_problem(info)
            if reason is not None:
                scan.rejected.append((where, reason))
                continue
            if is_webdataset_metadata(info.name):
                continue
            parts = split_key(info.name)
            if parts is None:
                scan.rejected.append((where, "member name has no extension, so it belongs to no sample"))
                continue
            key, ext = parts
            exts = members.setdefault(key, {})
            if ext in exts:
                scan.rejected.append((where, f"duplicate member .{ext} for key {key!r}"))
                continue
            exts[ext] = (info.offset_data, info.size)
    for key, exts in members.items():
        image_ext = image_member(exts)
        if image_ext is None:
            scan.rejected.append((f"{path}:{key}", f"sample has no image member (members: {', '.join(sorted(exts))})"))
            continue
        label_ext = label_member(exts) or ""
        scan.keys.append(key)
        scan.image_ext.append(image_ext)
        scan.image_span.append(exts[image_ext])
        scan.label_ext.append(label_ext)
        scan.label_span.append(exts[label_ext] if label_ext else (0, 0))
    return scan


def _members_until_damage(tar: tarfile.TarFile, scan: ShardScan) -> Iterator[tarfile.TarInfo]:
    """The members of `tar`; a truncated or corrupt tail is recorded as a rejection and ends the scan.

    Members before the damage stay usable; a member whose data is cut short fails when read, per sample.
    """
    count = 0
    while True:
        try:
            info = tar.next()
        except (OSError, tarfile.TarError) as err:
            scan.rejected.append((f"{scan.path}", f"tar truncated or corrupt after {count} member(s): {err}"))
            return
        if info is None:
            return
        count += 1
        yield info


def read_span(path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of the file at `path`; a short read (file changed or truncated) is an OSError."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: expected {size} bytes at offset {offset}, got {len(data)} (shard truncated?)")
    return data


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
            except (OSError, tarfile.TarError) as err:
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
        return read_span(self.shards[self._shard_of[index]], int(offset), int(size))

    def label(self, index: int) -> int:
        ext = self._label_ext[index]
        if not ext:
            return -1
        offset, size = self._label_span[index]
        shard = self.shards[self._shard_of[index]]
        data = read_span(shard, int(offset), int(size))
        try:
            return parse_label(data, ext)
        except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
            raise ImageDecodeError(f"bad label member .{ext}: {err}") from None

    def describe(self) -> str:
        return (
            f"WebDataset shards at {self.root}: {len(self)} samples in {len(self.shards)} shard(s)"
            f"{f', {len(self.rejected)} member(s) rejected' if self.rejected else ''}"
        )
