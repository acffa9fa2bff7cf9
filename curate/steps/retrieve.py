"""The retrieve step: select pool images by retrieval around each seed set (DINOv2's LVD-142M recipe), by balanced
sampling of the cluster hierarchy, or all of them."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from curate.errors import CurateError
from curate.manifest import (
    CLUSTER_PREFIX,
    RETRIEVE_SCHEMA,
    check_accounting,
    cluster_columns,
    derive_status,
    drop_columns,
    mask_of,
    read_manifest,
    set_columns,
    write_manifest,
)
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
    """Select pool images; write the manifest's selection columns and retrieval/summary.json."""
    from curate.selection.cluster import balanced_sample  # faiss
    from curate.selection.retrieve import retrieve as retrieve_for_seed_set

    rundir = context.rundir
    table = derive_status(drop_columns(read_manifest(rundir.manifest), RETRIEVE_SCHEMA.names))
    pool = np.nonzero(mask_of(table, "pool", ["ok"]))[0]
    n = table.num_rows
    reason: list[str | None] = [None] * n
    score = np.full(n, np.nan, dtype=np.float64)
    method = selection_method(cfg)
    levels = cluster_columns(table)
    uid_col = table.column("uid").to_pylist()
    per_set: dict[str, int] = {}
    if method == "retrieve":
        store = embedding_store(rundir, cfg)
        pool_emb = store.gather([uid_col[i] for i in pool]).astype(np.float32)
        level_col = f"{CLUSTER_PREFIX}{cfg.retrieve.cluster_level}"
        assign = (table.column(level_col).to_numpy(zero_copy_only=False) if level_col in table.column_names
                  else None)
        seed_rows = mask_of(table, "seed", ["ok"])
        source_col = np.asarray(table.column("source").to_pylist(), dtype=object)
        for src in cfg.seeds:  # each seed source is a seed set with its own cap
            name = source_name(src)
            seeds = np.nonzero(seed_rows & (source_col == name))[0]
            if seeds.size == 0:
                log.warning("retrieve: seed set %s has no usable image (all rejected?); it selects nothing", name)
                continue
            seed_emb = store.gather([uid_col[i] for i in seeds]).astype(np.float32)
            mask, why, sc = retrieve_for_seed_set(
                pool_emb, seed_emb, [uid_col[i] for i in seeds],
                assign[pool].astype(np.int64) if assign is not None else None,
                assign[seeds].astype(np.int64) if assign is not None else None, cfg.retrieve, cfg.index)
            better = mask & ~(np.nan_to_num(score[pool], nan=-np.inf) >= sc)  # ties: the earlier seed set
            for j in np.nonzero(better)[0]:
                reason[pool[j]], score[pool[j]] = why[j], sc[j]
            per_set[name] = int(mask.sum())
    elif method == "balanced":
        hierarchy = [(np.load(rundir.clusters / f"level{lv + 1}_centroids.npy"),
                      table.column(col).to_numpy(zero_copy_only=False)[pool].astype(np.int64))
                     for lv, col in enumerate(levels)]
        if not hierarchy:
            raise CurateError("balanced selection needs the cluster step's assignments: run `cluster` first")
        top = hierarchy[-1][1]
        for j in balanced_sample(hierarchy, cfg.select.n_balanced, cfg.select.seed):
            reason[pool[j]] = f"balanced:{len(hierarchy)}/{top[j]}"
    else:
        for i in pool:
            reason[i] = "all"
    decided = mask_of(table, "pool", ["ok", "duplicate", "contaminated"])
    selected = [bool(reason[i] is not None) if decided[i] else None for i in range(n)]
    scores = [None if np.isnan(v) else float(v) for v in score]
    table = derive_status(set_columns(table, {"selected": selected, "selected_by": reason,
                                              "retrieval_score": scores}, RETRIEVE_SCHEMA))
    write_manifest(table, rundir.manifest)
    counts = check_accounting(table, final=True)
    summary = {"method": method, "selected": counts["selected"], "not_selected": counts["not_selected"],
               "per_seed_set": per_set}
    rundir.retrieval.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rundir.retrieval / "summary.json", summary)
    return summary
