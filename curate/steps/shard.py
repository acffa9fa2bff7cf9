"""The shard step: the selected samples as WebDataset shards (original bytes + JSON metadata) and shards/index.json,
written partition by partition."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.dataset as ds
from tqdm import tqdm

from curate.manifest import CLUSTER_PREFIX, read_manifest
from curate.manifest_files import partitions_of, read_schema
from curate.rundir import THIS_CALL
from curate.shards.plan import (
    PARTS_DIR,
    SHARD_COLUMNS,
    finished_shard,
    image_extension,
    plan_all_shards,
    record_shard,
    sample_metadata,
)
from curate.shards.writer import ShardWriter, shard_name
from curate.sources.sample_reader import SampleReader
from dinoforge.data.shard_index import write_index

if TYPE_CHECKING:
    from curate.config import CurateConfig
    from curate.steps.runner import StepContext

log = logging.getLogger(__name__)


def config(cfg: CurateConfig) -> dict:
    return dataclasses.asdict(cfg.shards)


def run(cfg: CurateConfig, context: StepContext) -> dict | None:
    """Write the shards of this call's partitions; the index once every shard is written."""
    rundir = context.rundir
    rundir.prepare_output(rundir.shards, context.fingerprint, fresh=context.force)
    # the selected rows only, with the columns a shard holds, one partition read at a time: the manifest's other rows
    # are never in memory
    names = read_schema(rundir.manifest).names
    columns = [c for c in names if c in SHARD_COLUMNS or c.startswith(CLUSTER_PREFIX)]
    rows = [r for p in partitions_of(rundir.manifest) for r in read_manifest(
        rundir.manifest, columns, partitions=[p], where=ds.field("status") == "selected").to_pylist()]
    plan = plan_all_shards(rows, cfg.partitions, cfg.shards.max_count, cfg.shards.max_bytes)
    wanted = set(context.partitions) if context.partitions is not None else set(range(cfg.partitions))
    prefix = cfg.shards.prefix
    ours = {number for number, partition, _ in plan if partition in wanted}
    _remove_stale_temporaries(rundir.shards, rf"{re.escape(prefix)}-(\d+)\.tar", ours)
    _remove_stale_temporaries(rundir.shards / PARTS_DIR, r"(\d+)\.json", ours)
    written = 0
    with SampleReader() as reader:
        for number, partition, members in tqdm(plan, desc="shard", unit="shard", mininterval=2.0):
            if partition not in wanted or finished_shard(rundir.shards, prefix, number, partition, len(members)):
                continue
            writer = ShardWriter(rundir.shards / shard_name(prefix, number), partition)
            try:
                for i in members:
                    r = rows[i]
                    data = reader.read(r["file"], r["member"], r["offset"], r["size"])
                    if hashlib.sha256(data).hexdigest() != r["sha256"]:
                        raise OSError(f"{r['file']} {r['member'] or ''}: bytes changed since ingest (sha256 "
                                      "differs); rerun ingest (--force) to refresh the manifest")
                    writer.write(r["uid"], {image_extension(r): data, "json": sample_metadata(r)})
            except BaseException:
                writer.abort()
                raise
            record_shard(rundir.shards, number, writer.close())
            written += 1
    infos = [finished_shard(rundir.shards, prefix, n, p, len(m)) for n, p, m in plan]
    if any(i is None for i in infos):
        log.info("shard: %d of %d shards still to write; the step completes when all are written",
                 sum(i is None for i in infos), len(infos))
        return None
    write_index(rundir.shards, infos, {"run": cfg.name, "max_count": cfg.shards.max_count,
                                    "max_bytes": cfg.shards.max_bytes})
    return {"shards": len(infos), "samples": sum(i.count for i in infos), "bytes": sum(i.bytes for i in infos),
            THIS_CALL: {"written_now": written}}


def _remove_stale_temporaries(folder: Path, shard_file: str, numbers: set[int]) -> None:
    """Remove what killed writers left of the files of shards `numbers`: their temporary siblings, named
    `.<file>.<pid>.tmp` (dinoforge.atomic), where `shard_file` matches <file> and captures the shard number.

    A process id tells nothing across the nodes of an array job, so ownership decides, not liveness: this call
    writes every shard of its partitions that is not finished, so another process's temporary of one of them is
    debris of a killed run, or belongs to a predecessor of this (requeued) task writing the same bytes, whose rename
    then fails while this call writes the shard. Temporaries of other partitions belong to other tasks: left alone.
    """
    pattern = re.compile(rf"\.{shard_file}\.(\d+)\.tmp")
    for path in folder.glob(".*.tmp"):
        match = pattern.fullmatch(path.name)
        if match and int(match[1]) in numbers and int(match[2]) != os.getpid():
            log.info("shard: removing %s, left by an interrupted writer", path)
            path.unlink(missing_ok=True)
