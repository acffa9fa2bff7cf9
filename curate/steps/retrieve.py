"""The retrieve step: select pool images by retrieval around each seed set (DINOv2's LVD-142M recipe), by balanced
sampling of the cluster hierarchy, or all of them."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.embedding.rows import manifest_rows
from curate.errors import CurateError
from curate.manifest import (
    CLUSTER_PREFIX,
    RETRIEVE_SCHEMA,
    check_manifest_accounting,
    cluster_columns,
    derive_status,
    drop_columns,
    mask_of,
    read_manifest,
    set_columns,
)
from curate.manifest_files import read_schema, rewrite_partitions
from curate.sources.ingest import source_name
from curate.steps.embed import embedding_store
from dinoforge.atomic import atomic_write_json

if TYPE_CHECKING:
    from curate.config import CurateConfig
    from curate.steps.runner import StepContext

log = logging.getLogger(__name__)


def config(cfg: CurateConfig) -> dict:
    return {"retrieve": dataclasses.asdict(cfg.retrieve), "select": dataclasses.asdict(cfg.select),
            "index": dataclasses.asdict(cfg.index)}


def selection_method(cfg: CurateConfig) -> str:
    """The concrete selection method for `select.method` (resolving `auto`)."""
    if cfg.select.method != "auto":
        return cfg.select.method
    if cfg.seeds:
        return "retrieve"
    return "balanced" if cfg.select.n_balanced > 0 else "all"


def run(cfg: CurateConfig, context: StepContext) -> dict:
    """Select pool images; write the manifest's selection columns and retrieval/summary.json.

    Reads the few manifest columns it decides from, reads embeddings by partition (`curate.embedding.rows`), and
    rewrites the manifest one partition at a time."""
    from curate.selection.cluster import balanced_sample  # faiss
    from curate.selection.retrieve import retrieve as retrieve_for_seed_set

    rundir = context.rundir
    method = selection_method(cfg)
    levels = cluster_columns(read_schema(rundir.manifest).empty_table())
    table = read_manifest(rundir.manifest, ["uid", "role", "status", "source", "partition", *levels])
    # the statuses before any selection: a rerun of this step finds its own earlier ones
    before = pc.if_else(pc.is_in(table.column("status"), value_set=pa.array(["selected", "not_selected"])), "ok",
                        table.column("status"))
    table = set_columns(table, {"status": before})
    pool = np.nonzero(mask_of(table, "pool", ["ok"]))[0]
    n = table.num_rows
    reason: dict[int, str] = {}  # manifest row -> why it is selected
    score = np.full(n, np.nan, dtype=np.float64)
    per_set: dict[str, int] = {}
    if method == "retrieve":
        store = embedding_store(rundir, cfg)
        pool_emb = manifest_rows(store, table, pool)  # read in chunks when searched
        pool_part = table.column("partition").to_numpy()[pool]
        shards = [np.nonzero(pool_part == p)[0] for p in range(cfg.partitions)]  # indexed one at a time
        level_col = f"{CLUSTER_PREFIX}{cfg.retrieve.cluster_level}"
        assign = (table.column(level_col).to_numpy(zero_copy_only=False) if level_col in table.column_names
                  else None)
        seed_rows = mask_of(table, "seed", ["ok"])
        source_col = table.column("source")
        for src in cfg.seeds:  # each seed source is a seed set with its own cap
            name = source_name(src)
            seeds = np.nonzero(seed_rows & np.asarray(pc.equal(source_col, name).to_numpy(zero_copy_only=False)))[0]
            if seeds.size == 0:
                log.warning("retrieve: seed set %s has no usable image (all rejected?); it selects nothing", name)
                continue
            seed_table = table.take(pa.array(seeds, type=pa.int64()))
            mask, why, sc = retrieve_for_seed_set(
                pool_emb, manifest_rows(store, seed_table)[:], seed_table.column("uid").to_pylist(),
                assign[pool].astype(np.int64) if assign is not None else None,
                assign[seeds].astype(np.int64) if assign is not None else None, cfg.retrieve, cfg.index, shards)
            better = mask & ~(np.nan_to_num(score[pool], nan=-np.inf) >= sc)  # ties: the earlier seed set
            for j in np.nonzero(better)[0]:
                reason[int(pool[j])], score[pool[j]] = why[j], sc[j]
            per_set[name] = int(mask.sum())
    elif method == "balanced":
        hierarchy = [(np.load(rundir.clusters / f"level{lv + 1}_centroids.npy"),
                      table.column(col).to_numpy(zero_copy_only=False)[pool].astype(np.int64))
                     for lv, col in enumerate(levels)]
        if not hierarchy:
            raise CurateError("balanced selection needs the cluster step's assignments: run `cluster` first")
        top = hierarchy[-1][1]
        for j in balanced_sample(hierarchy, cfg.select.n_balanced, cfg.select.seed):
            reason[int(pool[j])] = f"balanced:{len(hierarchy)}/{top[j]}"
    else:
        reason = dict.fromkeys(pool.tolist(), "all")
    decided = mask_of(table, "pool", ["ok", "duplicate", "contaminated"])
    chosen, why = np.zeros(n, dtype=bool), np.full(n, None, dtype=object)
    if reason:
        rows = np.fromiter(reason, dtype=np.int64, count=len(reason))
        chosen[rows], why[rows] = True, list(reason.values())

    def with_selection(part: pa.Table, rows: slice) -> pa.Table:
        return derive_status(set_columns(drop_columns(part, RETRIEVE_SCHEMA.names), {
            "selected": pa.array(chosen[rows], mask=~decided[rows]),
            "selected_by": pa.array(why[rows], pa.string()),
            "retrieval_score": pa.array(score[rows], pa.float32(), mask=np.isnan(score[rows]))}))

    rewrite_partitions(rundir.manifest, with_selection)
    counts = check_manifest_accounting(rundir.manifest, final=True)
    summary = {"method": method, "selected": counts["selected"], "not_selected": counts["not_selected"],
               "per_seed_set": per_set}
    rundir.retrieval.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rundir.retrieval / "summary.json", summary)
    return summary
