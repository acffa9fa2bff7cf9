"""Which selected sample goes into which shard, what each sample's members hold, and which shards are finished.

The plan depends only on the manifest and the shard limits, so it is the same in every array task and every rerun:
shards hold the selected samples of one partition each, in manifest order, cut by count and payload bytes, and are
numbered across partitions in order.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import asdict
from pathlib import Path

from curate.manifest import CLUSTER_PREFIX
from curate.shards.writer import plan_shards, shard_name
from dinoforge.atomic import atomic_write_json
from dinoforge.data.formats import EXTENSION_OF_FORMAT
from dinoforge.data.shard_index import ShardEntry
from dinoforge.hashing import file_sha256

PARTS_DIR = "_parts"  # shards/_parts/NNNNNN.json: the index entry of each finished shard
METADATA_KEYS = ("uid", "source", "locator", "sha256", "format", "width", "height", "partition", "selected_by",
                 "retrieval_score")
# the manifest columns the shard step reads: the metadata, the plan's and the bytes' location (plus cluster columns)
SHARD_COLUMNS = (*METADATA_KEYS, "status", "size", "file", "member", "offset")


def plan_all_shards(rows: list[dict], n_partitions: int, max_count: int,
                    max_bytes: int) -> list[tuple[int, int, list[int]]]:
    """(shard number, partition, indices into `rows`) for every shard, over the rows with status `selected`."""
    by_partition: dict[int, list[int]] = {p: [] for p in range(n_partitions)}
    for i, r in enumerate(rows):
        if r["status"] == "selected":
            by_partition[r["partition"]].append(i)
    plan = []
    for p in range(n_partitions):
        members = by_partition[p]
        sizes = [rows[i]["size"] + len(sample_metadata(rows[i])) for i in members]
        for start, stop in plan_shards(sizes, max_count, max_bytes):
            plan.append((len(plan), p, members[start:stop]))
    return plan


def sample_metadata(row: dict) -> bytes:
    """The `<key>.json` member of a sample (sorted keys, fixed float precision: identical bytes on every run)."""
    meta = {k: row[k] for k in METADATA_KEYS}
    meta["clusters"] = {k[len(CLUSTER_PREFIX):]: row[k] for k in sorted(row) if k.startswith(CLUSTER_PREFIX)}
    if meta["retrieval_score"] is not None:
        meta["retrieval_score"] = round(float(meta["retrieval_score"]), 6)
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def image_extension(row: dict) -> str:
    """The image member's extension: its real format, so decoders that go by extension read it right."""
    return EXTENSION_OF_FORMAT.get(row["format"], "img")


def finished_shard(shards_dir: Path, prefix: str, number: int, partition: int, count: int) -> ShardEntry | None:
    """The index entry of shard `number` when it is complete with `count` samples, else None (write it)."""
    path = shards_dir / shard_name(prefix, number)
    part = shards_dir / PARTS_DIR / f"{number:06d}.json"
    if not path.is_file():
        return None
    if part.is_file():
        info = ShardEntry(**json.loads(part.read_text()))
        return info if info.count == count and info.bytes == path.stat().st_size else None
    # Killed between the shard's rename and the write of its entry: rebuild the entry from the shard itself.
    with tarfile.open(path) as tar:
        keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
    if len(keys) != count:
        return None
    info = ShardEntry(path.name, count, path.stat().st_size, file_sha256(path), partition, keys[0], keys[-1])
    record_shard(shards_dir, number, info)
    return info


def record_shard(shards_dir: Path, number: int, info: ShardEntry) -> None:
    """Store a finished shard's index entry (atomic)."""
    atomic_write_json(shards_dir / PARTS_DIR / f"{number:06d}.json", asdict(info))
