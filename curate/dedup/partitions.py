"""The dedup step split by partition: per-partition kNN queries (Slurm array tasks), then one merge.

Each partition searches its own rows against the whole deduplication base (the pool images left after exact
dedup) and against the evaluation sets, and saves what it found: kNN-graph edges at or above the copy threshold,
every row's best evaluation match, and nearest-neighbour similarities of a sample (for the report). The merge joins
the edges of all partitions into components (`curate.dedup.kernels.near_duplicates_from_edges`, the same union-find and
keep rule as the in-memory `near_duplicates`) and spreads contamination to whole components. Run in one process or
as many tasks, the result is the same.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from curate.dedup.kernels import near_duplicates_from_edges, spread_contamination
from curate.knn.graph import edges_of, knn_search, unique_edges
from curate.knn.index import IndexConfig, build_index, plan_index
from dinoforge.atomic import atomic_write


@dataclass
class PartitionQueries:
    """What one partition's queries found; row numbers index the deduplication base."""

    rows: np.ndarray  # int64 [q]: the partition's rows
    edge_i: np.ndarray  # int64 [e]
    edge_j: np.ndarray  # int64 [e]
    edge_sim: np.ndarray  # float32 [e]
    eval_index: np.ndarray  # int64 [q]: most similar evaluation image of each row (-1 without eval sets)
    eval_sim: np.ndarray  # float32 [q]: its cosine similarity (NaN without eval sets)
    nn_rows: np.ndarray  # int64 [s]: sampled rows whose nearest neighbour was measured
    nn_sim: np.ndarray  # float32 [s]: cosine similarity to the nearest other base row
    index_plans: np.ndarray  # str (JSON): the indexes the queries searched: {"kNN graph": plan, "decontamination": ...}

    def save(self, path: Path) -> None:
        """Write atomically (the file's presence marks the partition done)."""
        atomic_write(path, lambda fh: np.savez(fh, **{f.name: getattr(self, f.name) for f in fields(self)}))

    @classmethod
    def load(cls, path: Path) -> PartitionQueries:
        with np.load(path) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})

    def plans(self) -> dict:
        """{search: the `curate.knn.index.IndexPlan` it used, as a dict (None: nothing was indexed)}."""
        return json.loads(str(self.index_plans))


def query_partition(base: np.ndarray, rows: np.ndarray, eval_emb: np.ndarray | None, k: int, threshold: float,
                    nn_rows: np.ndarray, use_gpu: str = "auto", index_cfg: IndexConfig | None = None,
                    shards: Sequence[np.ndarray] | None = None, cache: Path | None = None) -> PartitionQueries:
    """Search `rows` of `base` against all of `base` (edges >= threshold) and against `eval_emb` (best match).

    Both indexes are built as `index_cfg` says (`curate.knn.index`; None: flat); `shards` (the base rows of each
    partition) are indexed one at a time (`ShardedIndex`: the memory of one partition's rows), and `cache` keeps the
    trained IVF cells for the other partitions. `nn_rows` (a sample of `rows`) get their nearest other row's
    similarity from the same search.
    """
    rows, nn_rows = np.asarray(rows, dtype=np.int64), np.asarray(nn_rows, dtype=np.int64)
    if not np.isin(nn_rows, rows).all():
        raise ValueError("nn_rows must be rows of the partition searched")
    index = build_index(base, index_cfg, use_gpu, shards=shards, cache=cache, what="kNN graph")
    # one search serves the graph and the nearest-neighbour sample; one extra neighbour: the query finds itself
    i, j, s = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    if rows.size:
        found_sims, found_ids = index.search(base[rows], min(k + 1, len(base)))
        i, j, s = unique_edges(*edges_of(rows, found_sims, found_ids, threshold))
    if eval_emb is not None and len(eval_emb) and rows.size:
        sims, ids = knn_search(eval_emb, base[rows], 1, use_gpu=use_gpu, progress=False, index_cfg=index_cfg,
                               what="decontamination")
        eval_index, eval_sim = ids[:, 0], sims[:, 0]
    else:
        eval_index, eval_sim = np.full(rows.size, -1, dtype=np.int64), np.full(rows.size, np.nan, dtype=np.float32)
    nn_sim = np.full(nn_rows.size, np.nan, dtype=np.float32)
    if nn_rows.size and len(base) > 1:
        order = np.argsort(rows, kind="stable")
        at = order[np.searchsorted(rows, nn_rows, sorter=order)]  # each sampled row's place among the queries
        # The best hit that is not the query itself (an identical twin can rank before the query).
        nn_sim = np.where(found_ids[at, 0] == nn_rows, found_sims[at, 1], found_sims[at, 0]).astype(np.float32)
    # the plan of the index built here; decontamination's is the one `knn_search` builds for the eval set's size
    plans = {"kNN graph": index.plan.as_dict(),
             "decontamination": plan_index(index_cfg, len(eval_emb), base.shape[1], "decontamination").as_dict()
             if eval_emb is not None and len(eval_emb) else None}
    return PartitionQueries(rows, i, j, s, eval_index.astype(np.int64), eval_sim.astype(np.float32), nn_rows, nn_sim,
                            np.array(json.dumps(plans)))


@dataclass
class MergedDedup:
    """Per base row: duplicate_of_index (-1 kept), component id, matched eval index (-1 clean) and similarities."""

    duplicate_of: np.ndarray
    component: np.ndarray
    contaminated_by: np.ndarray
    eval_sim: np.ndarray  # best cosine to any eval image (NaN without eval sets)
    nn_sim: np.ndarray  # NaN for rows outside the sample
    n_edges: int


def merge_partitions(n: int, parts: list[PartitionQueries], uids: list[str], eval_threshold: float,
                     keep: str) -> MergedDedup:
    """Components of the union of all partitions' edges; contamination spread to whole components."""
    if parts:
        i, j, s = unique_edges(np.concatenate([p.edge_i for p in parts]), np.concatenate([p.edge_j for p in parts]),
                               np.concatenate([p.edge_sim for p in parts]))
    else:
        i = j = np.zeros(0, dtype=np.int64)
    duplicate_of, component = near_duplicates_from_edges(n, i, j, uids, keep)
    eval_index = np.full(n, -1, dtype=np.int64)
    eval_sim = np.full(n, np.nan, dtype=np.float32)
    nn_sim = np.full(n, np.nan, dtype=np.float32)
    for p in parts:
        eval_index[p.rows], eval_sim[p.rows] = p.eval_index, p.eval_sim
        nn_sim[p.nn_rows] = p.nn_sim
    contaminated_by = spread_contamination(eval_index, eval_sim, component, eval_threshold)
    return MergedDedup(duplicate_of, component, contaminated_by, eval_sim, nn_sim, len(i))
