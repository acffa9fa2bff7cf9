"""The dedup step: exact (sha256) then near-duplicate (kNN-graph components) removal of pool images, and
decontamination against the evaluation sets.

The kNN queries run per partition (dedup/queries/part-PPPPP.npz); the merge runs once all exist.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from curate.dedup.config import COPYDETECT_THRESHOLDS
from curate.manifest import (
    DEDUP_SCHEMA,
    check_accounting,
    derive_status,
    drop_columns,
    mask_of,
    read_manifest,
    set_columns,
    write_manifest,
)
from curate.rundir import RunDir
from curate.steps.embed import embedding_store
from dinoforge.atomic import atomic_write

if TYPE_CHECKING:
    from curate.config import CurateConfig
    from curate.steps.runner import StepContext

log = logging.getLogger(__name__)


def config(cfg: CurateConfig) -> dict:
    # the index is part of the result: an approximate one may miss copies that an exact one finds
    return {"dedup": dataclasses.asdict(cfg.dedup), "index": dataclasses.asdict(cfg.index),
            "nn_sample": cfg.report.nn_sample, "seed": cfg.report.seed}


def run(cfg: CurateConfig, context: StepContext) -> dict | None:
    """Query the partitions of this call; once every partition is queried, merge and write the dedup columns."""
    from curate.dedup.kernels import exact_duplicates  # faiss: imported only when deduplicating
    from curate.dedup.partitions import PartitionQueries, merge_partitions, query_partition

    rundir = context.rundir
    _warn_uncalibrated_thresholds(cfg)
    table = derive_status(drop_columns(read_manifest(rundir.manifest), DEDUP_SCHEMA.names))
    store = embedding_store(rundir, cfg, "dedup_model")
    uid_col, sha_col = table.column("uid").to_pylist(), table.column("sha256").to_pylist()
    part_col = table.column("partition").to_numpy()
    pool = np.nonzero(mask_of(table, "pool") & ~mask_of(table, statuses=["rejected"]))[0]
    pool_uids = [uid_col[i] for i in pool]
    exact = exact_duplicates([sha_col[i] for i in pool], pool_uids, cfg.dedup.keep)
    base = pool[exact < 0]  # manifest rows of the deduplication base: one image per distinct file
    base_uids = [uid_col[i] for i in base]
    queries_dir = rundir.dedup / "queries"
    rundir.prepare_output(queries_dir, context.fingerprint, fresh=context.force)
    todo = [p for p in (context.partitions if context.partitions is not None else range(cfg.partitions))
            if not (queries_dir / f"part-{p:05d}.npz").is_file()]
    evals = np.nonzero(mask_of(table, "eval", ["ok"]))[0]
    eval_uids = [uid_col[i] for i in evals]
    nn_rows = _nn_sample(len(base), cfg)
    if todo:
        emb = store.gather(base_uids).astype(np.float32)
        eval_emb = store.gather(eval_uids).astype(np.float32) if eval_uids else None
        base_part = part_col[base]
        shards = [np.nonzero(base_part == p)[0] for p in range(cfg.partitions)]  # an IVF index is filled per partition
        for p in tqdm(todo, desc="dedup queries", unit="partition"):
            found = query_partition(emb, shards[p], eval_emb, cfg.dedup.k, cfg.dedup.threshold,
                                    nn_rows[base_part[nn_rows] == p], cfg.dedup.use_gpu, cfg.index, shards,
                                    queries_dir / "ivf-trained.faiss")
            found.save(queries_dir / f"part-{p:05d}.npz")
    missing = [p for p in range(cfg.partitions) if not (queries_dir / f"part-{p:05d}.npz").is_file()]
    if missing:
        log.info("dedup: %d partitions still to query (%s...); the merge runs when all are done", len(missing),
                 missing[:8])
        return None
    parts = [PartitionQueries.load(queries_dir / f"part-{p:05d}.npz") for p in range(cfg.partitions)]
    merged = merge_partitions(len(base), parts, base_uids, cfg.dedup.eval_threshold, cfg.dedup.keep)

    n = table.num_rows
    dup_of: list[str | None] = [None] * n
    dup_kind: list[str | None] = [None] * n
    component: list[int | None] = [None] * n
    contaminated: list[str | None] = [None] * n
    eval_sim: list[float | None] = [None] * n
    nn_sim: list[float | None] = [None] * n
    for j, i in enumerate(base.tolist()):
        component[i] = int(merged.component[j])
        if merged.duplicate_of[j] >= 0:
            dup_of[i], dup_kind[i] = base_uids[merged.duplicate_of[j]], "near"
        if merged.contaminated_by[j] >= 0:
            contaminated[i] = eval_uids[merged.contaminated_by[j]]
        if not np.isnan(merged.eval_sim[j]):
            eval_sim[i] = float(merged.eval_sim[j])
        if not np.isnan(merged.nn_sim[j]):
            nn_sim[i] = float(merged.nn_sim[j])
    for k in np.nonzero(exact >= 0)[0]:  # an exact copy shares its group and fate with the file it copies
        i, kept = int(pool[k]), int(pool[exact[k]])
        dup_of[i], dup_kind[i] = uid_col[kept], "exact"
        component[i], contaminated[i], eval_sim[i] = component[kept], contaminated[kept], eval_sim[kept]
    table = set_columns(table, {"duplicate_of": dup_of, "duplicate_kind": dup_kind, "component": component,
                                "contaminated_by": contaminated, "eval_similarity": eval_sim,
                                "nn_similarity": nn_sim}, DEDUP_SCHEMA)
    table = derive_status(table)
    _write_dedup_groups(rundir, table)
    write_manifest(table, rundir.manifest)
    counts = check_accounting(table)
    return {"exact_duplicates": int((exact >= 0).sum()), "near_duplicates": int((merged.duplicate_of >= 0).sum()),
            "graph_edges": merged.n_edges, "contaminated": counts["contaminated"],
            "kept": counts["ok"] + counts["selected"] + counts["not_selected"],
            "components": int(len(np.unique(merged.component))),
            # the indexes the queries built (auto's choice, nlist, nprobe...), as partition 0 recorded them
            "index": parts[0].plans()["kNN graph"], "eval_index": parts[0].plans()["decontamination"]}


def _warn_uncalibrated_thresholds(cfg: CurateConfig) -> None:
    """The copydetect descriptor puts unrelated photos at a median cosine of 0.61, so thresholds below its calibrated
    ones (DINOv2's 0.6 / 0.45, made for SSCD-like copy features) remove much of the pool as copies."""
    if (cfg.dedup_embed or cfg.embed).kind != "copydetect":
        return
    below = [f"dedup.{key}={value} is below the copydetect embedding's calibrated {calibrated}"
             for key, value, calibrated in (("threshold", cfg.dedup.threshold, COPYDETECT_THRESHOLDS[0]),
                                            ("eval_threshold", cfg.dedup.eval_threshold, COPYDETECT_THRESHOLDS[1]))
             if value < calibrated]
    if below:
        log.warning("%s: unrelated photos will be removed as copies; leave the thresholds unset (the embedding's "
                    "defaults) unless that is intended", "; ".join(below))


def _nn_sample(n: int, cfg: CurateConfig) -> np.ndarray:
    """Base rows whose nearest-neighbour similarity is measured for the report (bounded, seeded, sorted)."""
    size = min(n, cfg.report.nn_sample)
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(cfg.report.seed).choice(n, size=size, replace=False)).astype(np.int64)


def _write_dedup_groups(rundir: RunDir, table: pa.Table) -> None:
    """dedup/groups.parquet: the pool rows of every duplicate group (kept and removed) and the contaminated ones."""
    removed = pc.is_valid(table.column("duplicate_of"))
    touched = pc.is_valid(table.column("contaminated_by"))
    kept_of_group = pc.is_in(table.column("uid"), value_set=table.filter(removed).column("duplicate_of"))
    cols = ["uid", "component", "duplicate_of", "duplicate_kind", "contaminated_by", "eval_similarity", "status"]
    groups = table.filter(pc.or_(pc.or_(removed, touched), kept_of_group)).select(cols)
    atomic_write(rundir.dedup / "groups.parquet", lambda fh: pq.write_table(groups, fh))
