"""The `shards/index.json` schema: written by curate's shard step, read by every dataset reader of curated shards.

    {"version": 1, "format": "webdataset", "total_samples": N, "total_bytes": B, "n_shards": S,
     ...run facts (run name, shard limits)...,
     "shards": [{"file", "count", "bytes", "sha256", "partition", "first_key", "last_key"}, ...]}

`file` is relative to the index's folder. An index without `version` was written by curate before the field
existed; its layout is version 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dinoforge.atomic import atomic_write_json
from dinoforge.data.errors import DatasetError

INDEX_NAME = "index.json"
VERSION = 1
_SUMMARY_KEYS = ("version", "format", "total_samples", "total_bytes", "n_shards", "shards")


@dataclass
class ShardEntry:
    """One finished shard, as listed in the index."""

    file: str
    count: int
    bytes: int  # size of the tar file
    sha256: str
    partition: int
    first_key: str
    last_key: str


@dataclass
class ShardIndex:
    """The shards of a curated set, in order, and the facts of the run that wrote them (`extra`)."""

    shards: list[ShardEntry]
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    @property
    def total_samples(self) -> int:
        return sum(s.count for s in self.shards)


def index_path(location: str | Path) -> Path:
    """The index file of `location`: the file itself, a shard folder, or a curate run directory."""
    p = Path(location)
    if p.name == INDEX_NAME and not p.is_dir():
        return p
    if (p / "shards" / INDEX_NAME).is_file():
        return p / "shards" / INDEX_NAME
    return p / INDEX_NAME


def write_index(shards_dir: str | Path, shards: Sequence[ShardEntry], extra: dict | None = None) -> Path:
    """Write `shards_dir/index.json` atomically; `extra` holds run facts (they must not reuse the schema's keys)."""
    clash = sorted(set(extra or {}) & set(_SUMMARY_KEYS))
    if clash:
        raise ValueError(f"shard index extra keys {clash} clash with the schema's own keys")
    doc = {
        "version": VERSION,
        "format": "webdataset",
        "total_samples": sum(s.count for s in shards),
        "total_bytes": sum(s.bytes for s in shards),
        "n_shards": len(shards),
        **(extra or {}),
        "shards": [asdict(s) for s in shards],
    }
    return atomic_write_json(Path(shards_dir) / INDEX_NAME, doc)


def read_index(location: str | Path) -> ShardIndex:
    """The index at `location` (see `index_path`); a `DatasetError` naming the problem when it is malformed."""
    path = index_path(location)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no shard index (expected a curate shards/{INDEX_NAME})") from None
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable shard index ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shards"), list):
        raise DatasetError(f"{path}: not a shard index: expected an object with a 'shards' list")
    version = doc.get("version", 1)
    if version != VERSION:
        raise DatasetError(f"{path}: shard index version {version!r}; this dinoforge reads version {VERSION}")
    names = [f.name for f in fields(ShardEntry)]
    types = {"file": str, "sha256": str, "first_key": str, "last_key": str}
    entries = []
    for i, entry in enumerate(doc["shards"]):
        if not isinstance(entry, dict) or set(entry) != set(names):
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DatasetError(f"{path}: shard entry {i} has fields {keys}; expected exactly {names}")
        for name in names:
            want = types.get(name, int)
            if not isinstance(entry[name], want) or isinstance(entry[name], bool):
                raise DatasetError(f"{path}: shard entry {i}: {name}={entry[name]!r} is not a {want.__name__}")
        entries.append(ShardEntry(**entry))
    if doc.get("n_shards", len(entries)) != len(entries):
        raise DatasetError(f"{path}: n_shards={doc['n_shards']} but {len(entries)} shard entries")
    extra = {k: v for k, v in doc.items() if k not in _SUMMARY_KEYS}
    return ShardIndex(entries, extra, version)


def shard_files(location: str | Path) -> list[str]:
    """Paths of the shards an index lists, resolved against its folder; each must exist."""
    path = index_path(location)
    index = read_index(path)
    if not index.shards:
        raise DatasetError(f"{path}: the shard index lists no shards")
    files = []
    for entry in index.shards:
        shard = path.parent / entry.file
        if not shard.is_file():
            raise FileNotFoundError(f"{path}: listed shard {entry.file!r} does not exist at {shard}")
        files.append(str(shard))
    return files
