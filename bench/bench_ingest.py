"""Ingest, manifest and shard-writing costs per item (the CPU side of `python -m curate plan`); prints one JSON object.

Images: the first `--n` JPEGs of a tar (default: the shared Imagenette archive next to the repository) or a folder,
written to a temporary folder. Measured: the ingest step's code (`ingest_sources`: list, read, sha256, probe,
manifest row, then `write_manifest`) in CPU seconds per image; the manifest's bytes per row on disk and in memory
(after ingest; later steps add columns); reading it back (`read_manifest`) per row, on a manifest of
`--manifest-rows` rows (the ingested rows tiled, uid and sha256 drawn at random so compression does not flatter it);
shard writing (`ShardWriter`, as the shard step: image bytes + JSON, fsync) in seconds per byte; the images' mean
size. Headline: ingest CPU time per image over sha256 alone, the floor any ingest pays.

    python bench/bench_ingest.py --n 1000 --record bench/costs.json   # ~30 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_embed import DEFAULT_TAR, read_images  # noqa: E402
from bench.headline import headline  # noqa: E402
from bench.timing import Clock  # noqa: E402
from curate.manifest import read_manifest, write_manifest  # noqa: E402
from curate.plan.costs import record_costs  # noqa: E402
from curate.shards.writer import ShardWriter  # noqa: E402
from curate.sources.ingest import IngestConfig, SourceConfig, ingest_sources  # noqa: E402


def random_hex(rng: np.random.Generator, n: int, chars: int) -> pa.Array:
    return pa.array([bytes(row).hex() for row in rng.integers(0, 256, (n, chars // 2), dtype=np.uint8)])


def tiled_manifest(table: pa.Table, rows: int, seed: int) -> pa.Table:
    """`rows` rows of `table` repeated, with random uid and sha256 columns (as distinct images have)."""
    big = pa.concat_tables([table] * -(-rows // table.num_rows)).slice(0, rows)
    rng = np.random.default_rng(seed)
    for name in ("uid", "sha256"):
        width = len(table.column(name)[0].as_py() or "0" * 64)
        big = big.set_column(big.schema.get_field_index(name), name, random_hex(rng, rows, width))
    return big


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="images ingested and written to a shard")
    parser.add_argument("--tar", default=str(DEFAULT_TAR))
    parser.add_argument("--folder", default=None, help="read the images of this folder instead of the tar")
    parser.add_argument("--manifest-rows", type=int, default=200_000, help="rows of the manifest read back")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--record", default=None, metavar="FILE", help="write the costs into this cost record "
                        "(bench/costs.json: what `python -m curate plan` reads)")
    args = parser.parse_args()

    images = read_images(args.folder, args.tar, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool"
        pool.mkdir()
        for i, data in enumerate(images):
            (pool / f"{i:06d}.jpg").write_bytes(data)
        clock = Clock()
        table = ingest_sources([("pool", SourceConfig(path=str(pool), name="pool"))], IngestConfig(),
                               args.partitions)
        write_manifest(table, Path(tmp) / "manifest.parquet")
        ingest_wall, ingest_cpu = clock.read()
        parts = (Path(tmp) / "manifest.parquet").resolve().rglob("*.parquet")  # the link's version folder
        disk_per_row = sum(f.stat().st_size for f in parts) / table.num_rows
        memory_per_row = table.nbytes / table.num_rows

        clock = Clock()
        for data in images:
            hashlib.sha256(data).hexdigest()
        sha_cpu = clock.read()[1]

        big = tiled_manifest(table, args.manifest_rows, seed=0)
        write_manifest(big, Path(tmp) / "big.parquet")
        clock = Clock()
        read_manifest(Path(tmp) / "big.parquet")
        read_wall, read_cpu = clock.read()

        start = time.perf_counter()
        with ShardWriter(Path(tmp) / "shard.tar") as writer:
            for i, data in enumerate(images):
                writer.write(f"{i:06d}", {"jpg": data, "json": json.dumps({"uid": f"{i:06d}"}).encode()})
        shard_s = time.perf_counter() - start
    total_bytes = sum(len(b) for b in images)
    n = len(images)
    costs = {
        "ingest_cpu_s_per_image": (ingest_cpu / n, "CPU s / image",
                                   "ingest step: list, read, sha256, probe, manifest row and write"),
        "manifest_disk_bytes_per_row": (disk_per_row, "bytes / row", "manifest files after ingest, on disk"),
        "manifest_memory_bytes_per_row": (memory_per_row, "bytes / row", "manifest after ingest, as an Arrow table"),
        "manifest_read_cpu_s_per_row": (read_cpu / args.manifest_rows, "CPU s / row",
                                        f"read_manifest of {args.manifest_rows} rows"),
        "shard_write_s_per_byte": (shard_s / total_bytes, "s / byte", "ShardWriter: image bytes + JSON, fsync"),
        "image_bytes_mean": (total_bytes / n, "bytes / image", f"mean encoded size of the {n} bench images"),
    }
    if args.record:
        record_costs(args.record, costs, sys.argv)
    print(json.dumps({
        "bench": "ingest", "images": n, "manifest_rows": args.manifest_rows,
        "ingest_s": round(ingest_wall, 3), "ingest_cpu_s": round(ingest_cpu, 3), "sha256_cpu_s": round(sha_cpu, 4),
        "manifest_read_s": round(read_wall, 3), "shard_write_s": round(shard_s, 3),
        "costs": {name: value for name, (value, _, _) in costs.items()}, "recorded_in": args.record,
        "headline": headline("ingest CPU time per image / sha256 alone (the floor of any ingest)",
                             ingest_cpu / max(sha_cpu, 1e-9), "sha256 of the same bytes, same process"),
    }))


if __name__ == "__main__":
    main()
