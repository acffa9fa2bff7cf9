"""The dedup step: exact (sha256) then near-duplicate (kNN-graph components) removal of pool images, and
decontamination against the evaluation sets.

The kNN queries run per partition (dedup/queries/part-PPPPP.npz); the merge runs once all exist.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from curate.dedup.config import COPYDETECT_THRESHOLDS
from curate.embedding.rows import manifest_rows
from curate.manifest import (
    DEDUP_SCHEMA,
    check_manifest_accounting,
    derive_status,
    drop_columns,
    mask_of,
    read_manifest,
    set_columns,
)
from curate.manifest_files import rewrite_partitions
from curate.steps.embed import embedding_store
from dinoforge.atomic import atomic_write

if TYPE_CHECKING:
    from curate.config import CurateConfig
    from curate.dedup.partitions import MergedDedup
    from curate.steps.runner import StepContext

log = logging.getLogger(__name__)


def config(cfg: CurateConfig) -> dict:
    # the index is part of the result: an approximate one may miss copies that an exact one finds
    return {"dedup": dataclasses.asdict(cfg.dedup), "index": dataclasses.asdict(cfg.index),
            "nn_sample": cfg.report.nn_sample, "seed": cfg.report.seed}


def run(cfg: CurateConfig, context: StepContext) -> dict | None:
    """Query the partitions of this call; once every partition is queried, merge and write the dedup columns.

    Reads the few manifest columns it decides from, reads embeddings by partition (`curate.embedding.rows`), and
    rewrites the manifest one partition at a time; the columns it writes are integer and float arrays over the
    manifest's rows until each partition's strings are made."""
    from curate.dedup.kernels import exact_duplicates  # faiss: imported only when deduplicating
    from curate.dedup.partitions import PartitionQueries, merge_partitions, query_partition

    rundir = context.rundir
    _warn_uncalibrated_thresholds(cfg)
    table = read_manifest(rundir.manifest, ["uid", "role", "sha256", "partition", "reject_reason"])
    store = embedding_store(rundir, cfg, "dedup_model")
    usable = np.asarray(pc.is_null(table.column("reject_reason")).to_numpy(zero_copy_only=False), dtype=bool)
    part_col = table.column("partition").to_numpy()
    pool = np.nonzero(mask_of(table, "pool") & usable)[0]
    pool_uids = pc.take(table.column("uid"), pa.array(pool, type=pa.int64()))
    exact = exact_duplicates(pc.take(table.column("sha256"), pa.array(pool, type=pa.int64())), pool_uids,
                             cfg.dedup.keep)
    base = pool[exact < 0]  # manifest rows of the deduplication base: one image per distinct file
    queries_dir = rundir.dedup / "queries"
    rundir.prepare_output(queries_dir, context.fingerprint, fresh=context.force)
    todo = [p for p in (context.partitions if context.partitions is not None else range(cfg.partitions))
            if not (queries_dir / f"part-{p:05d}.npz").is_file()]
    evals = np.nonzero(mask_of(table, "eval") & usable)[0]
    nn_rows = _nn_sample(len(base), cfg)
    if todo:
        # the base stays in the store's memory maps, read in chunks by the index; the evaluation sets are small
        emb = manifest_rows(store, table, base)
        eval_emb = manifest_rows(store, table, evals)[:] if evals.size else None
        base_part = part_col[base]
        shards = [np.nonzero(base_part == p)[0] for p in range(cfg.partitions)]  # indexed one partition at a time
        for p in tqdm(todo, desc="dedup queries", unit="partition"):
            found = query_partition(emb, shards[p], eval_emb, cfg.dedup.k, cfg.dedup.threshold,
                                    nn_rows[base_part[nn_rows] == p], cfg.dedup.use_gpu, cfg.index, shards,
                                    queries_dir / "ivf-trained.faiss")
            found.save(queries_dir / f"part-{p:05d}.npz")
        del emb, eval_emb
    missing = [p for p in range(cfg.partitions) if not (queries_dir / f"part-{p:05d}.npz").is_file()]
    if missing:
        log.info("dedup: %d partitions still to query (%s...); the merge runs when all are done", len(missing),
                 missing[:8])
        return None
    parts = [PartitionQueries.load(queries_dir / f"part-{p:05d}.npz") for p in range(cfg.partitions)]
    merged = merge_partitions(len(base), parts, pc.take(table.column("uid"), pa.array(base, type=pa.int64())),
                              cfg.dedup.eval_threshold, cfg.dedup.keep)
    found = DedupColumns.of(table.num_rows, base, evals, merged)
    found.add_exact(pool, exact)
    groups: list[pa.Table] = []

    def with_dedup(part: pa.Table, rows: slice) -> pa.Table:
        part = derive_status(set_columns(drop_columns(part, DEDUP_SCHEMA.names), found.columns(table, rows),
                                         DEDUP_SCHEMA))
        groups.append(part.filter(pa.array(found.in_group(rows))).select(GROUP_COLUMNS))
        return part

    rewrite_partitions(rundir.manifest, with_dedup)
    atomic_write(rundir.dedup / "groups.parquet", lambda fh: pq.write_table(pa.concat_tables(groups), fh))
    counts = check_manifest_accounting(rundir.manifest)
    return {"exact_duplicates": int((exact >= 0).sum()), "near_duplicates": int((merged.duplicate_of >= 0).sum()),
            "graph_edges": merged.n_edges, "contaminated": counts["contaminated"],
            "kept": counts["ok"] + counts["selected"] + counts["not_selected"],
            "components": int(len(np.unique(merged.component))),
            # the indexes the queries built (auto's choice, nlist, nprobe...), as partition 0 recorded them
            "index": parts[0].plans()["kNN graph"], "eval_index": parts[0].plans()["decontamination"]}


# dedup/groups.parquet: the pool rows of every duplicate group (kept and removed) and the contaminated ones
GROUP_COLUMNS = ["uid", "component", "duplicate_of", "duplicate_kind", "contaminated_by", "eval_similarity", "status"]
KINDS = pa.array([None, "exact", "near"], pa.string())  # duplicate_kind by code: 0 (not a duplicate), 1, 2


@dataclass
class DedupColumns:
    """The dedup columns of every manifest row as numbers: other rows are named by their manifest row (-1: none)."""

    duplicate_of: np.ndarray  # int64: the row of the image kept in its place
    kind: np.ndarray  # int8: code into KINDS
    component: np.ndarray  # int64, -1 outside the deduplication base
    contaminated_by: np.ndarray  # int64: the row of the evaluation image its component matched
    eval_sim: np.ndarray  # float32, NaN: none
    nn_sim: np.ndarray  # float32, NaN: not sampled

    @classmethod
    def of(cls, n: int, base: np.ndarray, evals: np.ndarray, merged: MergedDedup) -> DedupColumns:
        """From the merge of the deduplication base (`base`: its manifest rows; `evals`: the evaluation rows)."""
        out = cls(np.full(n, -1, np.int64), np.zeros(n, np.int8), np.full(n, -1, np.int64), np.full(n, -1, np.int64),
                  np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32))
        out.component[base] = merged.component
        near = merged.duplicate_of >= 0
        out.duplicate_of[base[near]], out.kind[base[near]] = base[merged.duplicate_of[near]], 2
        hit = merged.contaminated_by >= 0
        out.contaminated_by[base[hit]] = evals[merged.contaminated_by[hit]]
        out.eval_sim[base], out.nn_sim[base] = merged.eval_sim, merged.nn_sim
        return out

    def add_exact(self, pool: np.ndarray, exact: np.ndarray) -> None:
        """An exact copy shares its group and fate with the file it copies (`exact`: per pool row, as
        `exact_duplicates` returns it)."""
        copies = np.nonzero(exact >= 0)[0]
        rows, kept = pool[copies], pool[exact[copies]]
        self.duplicate_of[rows], self.kind[rows] = kept, 1
        self.component[rows], self.contaminated_by[rows] = self.component[kept], self.contaminated_by[kept]
        self.eval_sim[rows] = self.eval_sim[kept]

    def columns(self, table: pa.Table, rows: slice) -> dict[str, pa.Array]:
        """The DEDUP_SCHEMA columns of manifest rows `rows` (`table`: the manifest's uid column, in its order)."""
        uids = table.column("uid")

        def uid_of(index: np.ndarray) -> pa.ChunkedArray:
            return pc.take(uids, pa.array(index, type=pa.int64(), mask=index < 0))

        sims = {name: pa.array(v, pa.float32(), mask=np.isnan(v))
                for name, v in (("eval_similarity", self.eval_sim[rows]), ("nn_similarity", self.nn_sim[rows]))}
        return {"duplicate_of": uid_of(self.duplicate_of[rows]), "duplicate_kind": pc.take(KINDS, self.kind[rows]),
                "component": pa.array(self.component[rows], mask=self.component[rows] < 0),
                "contaminated_by": uid_of(self.contaminated_by[rows]), **sims}

    @cached_property
    def kept_for_a_copy(self) -> np.ndarray:
        kept = np.zeros(len(self.duplicate_of), dtype=bool)
        kept[self.duplicate_of[self.duplicate_of >= 0]] = True
        return kept

    def in_group(self, rows: slice) -> np.ndarray:
        """Rows `rows` that belong in dedup/groups.parquet: removed, contaminated, or kept for a removed copy."""
        return (self.duplicate_of[rows] >= 0) | (self.contaminated_by[rows] >= 0) | self.kept_for_a_copy[rows]


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
