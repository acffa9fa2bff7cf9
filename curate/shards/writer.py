"""WebDataset shard writing: deterministic tars written to a temporary name and renamed when complete.

Shards are planned before any is written (consecutive samples of one partition, cut by count and payload bytes,
numbered globally), so Slurm array tasks can write their partitions' shards independently, a rerun skips the shards
that exist, and an interrupted run ends with the same bytes as an uninterrupted one (fixed tar header fields).
The index they are listed in (`shards/index.json`) has its schema in `dinoforge.data.shard_index`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dinoforge.atomic import temporary_sibling
from dinoforge.data.shard_index import ShardEntry, read_index
from dinoforge.hashing import file_sha256


@dataclass
class ShardConfig:
    """Shard layout: a shard closes before it would exceed either limit (a single larger sample gets its own)."""

    max_count: int = 10_000  # samples per shard
    max_bytes: int = 1 << 30  # payload bytes per shard (image + JSON members, tar headers not counted)
    prefix: str = "curated"  # shards/<prefix>-000000.tar


class _HashingWriter(io.RawIOBase):
    """A write-only file that forwards to `fh` and hashes what passes, so a shard is checksummed in one pass."""

    def __init__(self, fh) -> None:
        self._fh, self.digest, self.size = fh, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._fh.write(data)


class ShardWriter:
    """Writes one WebDataset tar at `path`: members go to a hidden temporary name unique to this process (a requeued
    array task may overlap its predecessor); `close()` fsyncs and renames it into place."""

    def __init__(self, path: str | Path, partition: int = 0) -> None:
        self.path = Path(path)
        self.tmp = temporary_sibling(self.path)
        self.partition = partition
        self._fh = open(self.tmp, "wb")
        self._hashing = _HashingWriter(self._fh)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0
        self._keys: list[str] = []

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: `members` maps extension ("jpg", "json") to bytes; stored as `<key>.<ext>`."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"bad WebDataset key {key!r}: it must be non-empty without '.' or '/'")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            # Fixed header fields: identical inputs give byte-identical shards on every run and machine.
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self._keys.append(key)

    def close(self) -> ShardEntry:
        """Finish the tar and rename it to its final name; returns its index entry."""
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)
        return ShardEntry(self.path.name, self.count, self._hashing.size, self._hashing.digest.hexdigest(),
                         self.partition, self._keys[0] if self._keys else "", self._keys[-1] if self._keys else "")

    def abort(self) -> None:
        """Drop the temporary file (on error)."""
        self._tar.close()
        self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def plan_shards(sizes: Sequence[int], max_count: int, max_bytes: int) -> list[tuple[int, int]]:
    """Cut consecutive samples with payload `sizes` into [start, stop) ranges within both limits."""
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"shard limits must be positive, got max_count={max_count}, max_bytes={max_bytes}")
    ranges: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_count or total + size > max_bytes):
            ranges.append((start, i))
            start, total = i, 0
        total += size
    if len(sizes) > start:
        ranges.append((start, len(sizes)))
    return ranges


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def verify_shards(shards_dir: str | Path) -> list[str]:
    """Problems found when checking every shard of index.json against its size and checksum (empty when fine)."""
    problems = []
    for info in read_index(shards_dir).shards:
        path = Path(shards_dir) / info.file
        if not path.is_file():
            problems.append(f"{info.file}: missing")
        elif path.stat().st_size != info.bytes:
            problems.append(f"{info.file}: {path.stat().st_size} bytes, index says {info.bytes}")
        elif file_sha256(path) != info.sha256:
            problems.append(f"{info.file}: sha256 differs from index")
    return problems
