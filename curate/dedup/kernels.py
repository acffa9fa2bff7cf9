"""Deduplication kernels on arrays: exact (sha256), near-duplicate (kNN-graph components), decontamination.

The recipe is DINOv2's (Oquab et al. 2023, LVD-142M): a k=64 kNN graph of copy-detection embeddings, edges with
cosine >= 0.6, connected components by union-find, one image kept per component; then pool images within cosine
0.45 of an evaluation image are removed, with their whole component.

Keep rule (deterministic, independent of row order and of the number of partitions): in every group the image with
the smallest uid survives (`keep="first_uid"`); `keep="first_row"` keeps the first row instead. Every other member
records `duplicate_of` = the survivor, which is not necessarily its direct neighbour in the graph.

Everything on top of the faiss search is vectorised numpy (no Python loop over edges or rows), so the whole step
costs little more than the bare kNN search (see bench/bench_dedup.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.dedup.config import KEEP_RULES, NETWORK_THRESHOLDS
from curate.knn.graph import knn_search, range_pairs
from curate.knn.index import IndexConfig

log = logging.getLogger(__name__)

class UnionFind:
    """Disjoint sets over rows 0..n-1 with batched, vectorised unions.

    A set's root is its smallest row: `union` hooks the larger root under the smaller one (so parent pointers only
    decrease and no cycle can form) and `find` compresses paths by pointer jumping over the whole parent array.
    Each `union` call loops until every given pair shares a root; the number of rounds grows with the depth of the
    merges, not with the number of edges.
    """

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def _compress(self) -> None:
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        self.parent = parent

    def find(self, rows: np.ndarray | int | None = None) -> np.ndarray:
        """Root (smallest row of the set) of `rows`, or of every row when None."""
        self._compress()
        return self.parent.copy() if rows is None else self.parent[np.asarray(rows, dtype=np.int64)]

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the sets of a[e] and b[e] for every e."""
        a, b = np.asarray(a, dtype=np.int64).ravel(), np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"union needs pairs: {a.shape} vs {b.shape}")
        while a.size:
            self._compress()
            ra, rb = self.parent[a], self.parent[b]
            differ = ra != rb
            if not differ.any():
                break
            ra, rb = ra[differ], rb[differ]
            a, b = a[differ], b[differ]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            # Several pairs may hook the same root: the smallest target wins; the others merge next round.
            np.minimum.at(self.parent, hi, lo)

    def components(self) -> np.ndarray:
        """Component id of every row: the smallest row of its set."""
        return self.find()


def components_from_edges(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the graph on n rows with edges (i, j): id = smallest row in the component."""
    uf = UnionFind(n)
    uf.union(i, j)
    return uf.components()


def _uid_rank(uids: Sequence[str] | pa.Array) -> np.ndarray:
    """Rank of each uid in sorted order (ties, which uids should not have, broken by row)."""
    # Arrow's sort is stable and compares UTF-8 bytes, which orders as Python compares code points; unlike a numpy
    # string array it costs no fixed-width copy of every uid.
    order = pc.sort_indices(_strings(uids)).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def representatives(group: np.ndarray, uids: Sequence[str], keep: str = "first_uid") -> np.ndarray:
    """duplicate_of_index per row: -1 for the survivor of its group, else the survivor's row.

    `group` holds any integer label per row (rows with equal labels are duplicates of each other).
    """
    group = np.asarray(group, dtype=np.int64)
    n = len(group)
    if len(uids) != n:
        raise ValueError(f"{len(uids)} uids for {n} rows")
    if keep not in KEEP_RULES:
        raise ValueError(f"keep={keep!r}: use one of {', '.join(KEEP_RULES)}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    priority = _uid_rank(uids) if keep == "first_uid" else np.arange(n, dtype=np.int64)
    order = np.lexsort((priority, group))  # groups together, survivor first within each
    sorted_group = group[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_group[1:] != sorted_group[:-1]
    survivor_of_sorted = order[np.maximum.accumulate(np.where(starts, np.arange(n), 0))]
    duplicate_of = np.empty(n, dtype=np.int64)
    duplicate_of[order] = survivor_of_sorted
    duplicate_of[duplicate_of == np.arange(n)] = -1
    return duplicate_of


def exact_duplicates(sha256: Sequence[str] | pa.Array, uids: Sequence[str] | pa.Array,
                     keep: str = "first_uid") -> np.ndarray:
    """duplicate_of_index per row for byte-identical files (same sha256); -1 = kept."""
    if len(sha256) != len(uids):
        raise ValueError(f"{len(sha256)} sha256 digests for {len(uids)} uids")
    if len(uids) == 0:
        return np.zeros(0, dtype=np.int64)
    sha256 = _strings(sha256)
    group = pc.index_in(sha256, value_set=pc.unique(sha256)).to_numpy()
    return representatives(group, uids, keep)


def _strings(values: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    return values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, pa.string())


def near_duplicates_from_edges(n: int, i: np.ndarray, j: np.ndarray, uids: Sequence[str],
                               keep: str = "first_uid") -> tuple[np.ndarray, np.ndarray]:
    """(duplicate_of_index, component_id) from precomputed kNN-graph edges (e.g. merged from partitions)."""
    component = components_from_edges(n, i, j)
    return representatives(component, uids, keep), component


def near_duplicates(emb: np.ndarray, uids: Sequence[str], k: int = 64, threshold: float = NETWORK_THRESHOLDS[0],
                    keep: str = "first_uid", use_gpu: bool | str = "auto",
                    index_cfg: IndexConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Copies among `emb` rows: (duplicate_of_index (-1 = kept), component_id (= smallest row of the component)).

    Rows are joined when one is among the other's `k` nearest neighbours with cosine >= `threshold`; groups are
    the connected components of those edges (so A~B and B~C put A, B, C together even if A and C differ more).
    `index_cfg`: how the rows are indexed (`curate.knn.index`; None: flat, exact).
    """
    if len(emb) != len(uids):
        raise ValueError(f"{len(emb)} embeddings for {len(uids)} uids")
    i, j, _ = range_pairs(emb, k, threshold, use_gpu=use_gpu, index_cfg=index_cfg)
    duplicate_of, component = near_duplicates_from_edges(len(emb), i, j, uids, keep)
    log.info("near duplicates: %d edges >= %.3f, %d of %d rows removed, %d components", len(i), threshold,
             int((duplicate_of >= 0).sum()), len(emb), len(np.unique(component)) if len(component) else 0)
    return duplicate_of, component


def contamination_matches(pool_emb: np.ndarray, eval_emb: np.ndarray, threshold: float = NETWORK_THRESHOLDS[1],
                          component_id: np.ndarray | None = None,
                          use_gpu: bool | str = "auto",
                          index_cfg: IndexConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(eval_index per pool row (-1 = clean), each row's best cosine to any eval image (NaN without evals)).

    A pool row is contaminated when its most similar eval image reaches `threshold`; with `component_id`, so is
    every member of its component (see `spread_contamination`).
    """
    n = len(pool_emb)
    if n == 0 or len(eval_emb) == 0:
        return np.full(n, -1, dtype=np.int64), np.full(n, np.nan, dtype=np.float32)
    component = np.arange(n, dtype=np.int64) if component_id is None else np.asarray(component_id, dtype=np.int64)
    if len(component) != n:
        raise ValueError(f"component_id has {len(component)} rows, pool_emb {n}")
    sims, ids = knn_search(eval_emb, pool_emb, 1, use_gpu=use_gpu, index_cfg=index_cfg, what="decontamination")
    return spread_contamination(ids[:, 0], sims[:, 0], component, threshold), sims[:, 0].astype(np.float32)


def spread_contamination(eval_index: np.ndarray, eval_sim: np.ndarray, component: np.ndarray,
                         threshold: float) -> np.ndarray:
    """Matched eval index per row (-1 clean): rows within `threshold` of an eval image, and every other member of
    their component, which takes the component's best match (a copy of a copy of a test image is a test image)."""
    direct = np.nan_to_num(eval_sim, nan=-np.inf) >= threshold
    out = np.full(len(component), -1, dtype=np.int64)
    if not direct.any():
        return out
    hit = np.nonzero(direct)[0]
    order = hit[np.lexsort((-eval_sim[hit], component[hit]))]  # best match first within each component
    comps, first = np.unique(component[order], return_index=True)
    best_eval = eval_index[order[first]]
    pos = np.minimum(np.searchsorted(comps, component), len(comps) - 1)
    touched = comps[pos] == component
    out[touched] = best_eval[pos[touched]]
    out[direct] = eval_index[direct]  # a direct match keeps its own eval image
    return out


def decontaminate(pool_emb: np.ndarray, eval_emb: np.ndarray, eval_uids: Sequence[str],
                  threshold: float = NETWORK_THRESHOLDS[1], component_id: np.ndarray | None = None,
                  use_gpu: bool | str = "auto", index_cfg: IndexConfig | None = None) -> list[str | None]:
    """The matched eval uid per pool row, None when clean; a component touching an eval image goes whole."""
    if len(eval_uids) != len(eval_emb):
        raise ValueError(f"{len(eval_uids)} eval uids for {len(eval_emb)} eval embeddings")
    eval_index, _ = contamination_matches(pool_emb, eval_emb, threshold, component_id, use_gpu, index_cfg)
    matched = [None if e < 0 else eval_uids[e] for e in eval_index.tolist()]
    log.info("decontamination: %d of %d pool rows match an eval image at cosine >= %.3f",
             int((eval_index >= 0).sum()), len(eval_index), threshold)
    return matched
