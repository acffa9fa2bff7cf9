"""Cosine kNN search with faiss and the kNN-graph edges above a similarity threshold.

The database is indexed by `curate.knn.index`: exact (flat) unless an `IndexConfig` asks for IVF. faiss runs on the GPU
when its smoke test passed in this process (`curate.knn.faiss_device`), else on the CPU.

Embeddings are L2-normalised, so the inner product is the cosine similarity and a flat inner-product index gives
exact neighbours (IVF: exact similarities of the neighbours it finds). Queries run in chunks: memory stays bounded by
`chunk_size * k` and a progress bar can move.

A faiss GPU index has no range search, and on CPU the range search of a flat index scans as much as a kNN search
does; so "all neighbours above a threshold" is always emulated by a kNN search followed by a threshold, on every
device. This caps the neighbours per image at `k` (DINOv2 uses k=64), which is what makes the edges of one query
chunk a bounded array and the results identical on CPU and GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

# gpu_available, resolve_use_gpu: where faiss runs, also imported from here by callers of this module
from curate.knn.faiss_device import gpu_available, resolve_use_gpu  # noqa: F401

# as_float32, GPU_MAX_K: imported from here by the steps; the index itself lives in curate.knn.index
from curate.knn.index import GPU_MAX_K, IndexConfig, ShardedIndex, VectorIndex, as_float32, build_index  # noqa: F401

if TYPE_CHECKING:
    from curate.embedding.rows import EmbeddingRows

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 16384  # queries per faiss call: [chunk, k] float32 + int64 results, about 12 MB at k=64


def _chunks(n: int, chunk_size: int, desc: str, progress: bool) -> tqdm:
    starts = range(0, n, max(1, chunk_size))
    return tqdm(starts, desc=desc, unit="chunk", disable=not progress or len(starts) <= 1, leave=False)


def knn_search(xb: np.ndarray | EmbeddingRows, xq: np.ndarray, k: int, use_gpu: bool | str = "auto",
               chunk_size: int = DEFAULT_CHUNK, progress: bool = True,
               index_cfg: IndexConfig | None = None, what: str = "index",
               shards: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `k` most similar database rows of every query: (sims float32 [nq, k], ids int64 [nq, k]).

    `index_cfg`: how `xb` is indexed (`curate.knn.index`; None: flat, exact); `what`: the index's name in messages;
    `shards`: row arrays partitioning `xb`, indexed one at a time (`curate.knn.index.ShardedIndex`).
    When `k` exceeds the database size the extra columns hold id -1 and similarity -inf.
    """
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    xb = xb if hasattr(xb, "shape") else np.asarray(xb)  # an array-like read by rows stays unread
    xq = np.asarray(xq)
    sims = np.full((len(xq), k), -np.inf, dtype=np.float32)
    ids = np.full((len(xq), k), -1, dtype=np.int64)
    if len(xb) == 0 or len(xq) == 0:
        return sims, ids
    if xb.shape[1] != xq.shape[1]:
        raise ValueError(f"query dim {xq.shape[1]} != database dim {xb.shape[1]}")
    index = build_index(xb, index_cfg, use_gpu, shards=shards, what=what)
    kk = min(k, index.ntotal)
    if index.whole_batches:
        chunk_size = len(xq)
    for start in _chunks(len(xq), chunk_size, "kNN search", progress):
        s, i = index.search(xq[start:start + chunk_size], kk)
        sims[start:start + len(s), :kk] = s
        ids[start:start + len(s), :kk] = i
    return sims, ids


def range_pairs(x: np.ndarray | EmbeddingRows, k: int, threshold: float, use_gpu: bool | str = "auto",
                query_rows: np.ndarray | None = None, chunk_size: int = DEFAULT_CHUNK,
                progress: bool = True, index: VectorIndex | ShardedIndex | None = None,
                index_cfg: IndexConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges (i, j, sim) of the kNN graph of `x` with cosine >= `threshold`, i != j.

    Each row of `query_rows` (default: all rows) is searched against all of `x`; an edge is kept once, as
    (min, max), sorted. Running disjoint `query_rows` (e.g. one partition per Slurm task) and concatenating the
    results gives the same graph as one call, up to edges found from both ends (deduplicate with `unique_edges`).
    `index`: an index of `x` already built (a caller that searches `x` again saves a second build); else one is
    built as `index_cfg` says (None: flat, exact). An approximate index may miss edges, never invent them: the
    similarities it returns are exact.
    """
    x = x if hasattr(x, "shape") else np.asarray(x)  # an array-like read by rows stays unread (curate.knn.index)
    n = x.shape[0]
    rows = np.arange(n, dtype=np.int64) if query_rows is None else np.asarray(query_rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"query_rows must index the {n} rows of x")
    if n < 2 or rows.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.float32)
    index = index or build_index(x, index_cfg, use_gpu, what="kNN graph")
    # One extra neighbour because the query itself is (almost always) its own first hit.
    kk = min(k + 1, n)
    if index.whole_batches:
        chunk_size = len(rows)
    found_i, found_j, found_s = [], [], []
    for start in _chunks(len(rows), chunk_size, "kNN graph", progress):
        q = rows[start:start + chunk_size]
        i, j, s = edges_of(q, *index.search(x[q], kk), threshold)
        found_i.append(i)
        found_j.append(j)
        found_s.append(s)
    return unique_edges(np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s))


def edges_of(q: np.ndarray, sims: np.ndarray, ids: np.ndarray,
             threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The directed edges (query row, neighbour, sim) of search results for rows `q` with cosine >= `threshold`,
    leaving out each query's own row."""
    keep = (sims >= threshold) & (ids >= 0) & (ids != q[:, None])
    qi, col = np.nonzero(keep)
    return q[qi], ids[qi, col], sims[qi, col]


def unique_edges(i: np.ndarray, j: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges as (min, max) pairs, each once (the highest similarity kept), sorted by (i, j)."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    sim = np.asarray(sim, dtype=np.float32)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((-sim, hi, lo))  # by (lo, hi), best similarity first within a pair
    lo, hi, sim = lo[order], hi[order], sim[order]
    first = np.ones(len(lo), dtype=bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], sim[first]
