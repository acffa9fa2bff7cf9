"""Seed-based retrieval from the deduplicated pool (the last stage of DINOv2's LVD-142M recipe).

Two modes, as in the DINOv2 paper:
- sample: every seed image brings its `n_per_seed` nearest pool images (cosine); a pool image reached from
  several seeds records the most similar one (`seed:<uid>`).
- cluster: every cluster (of the k-means level whose assignments the caller passes) that holds more than
  `min_seeds_per_cluster` seed images brings up to `m_per_cluster` of its pool images, those most similar to the
  mean of the cluster's seeds first (`cluster:<level>/<id>`).
`auto` uses sample mode for large seed sets (>= `auto_threshold` images: their neighbours alone are plenty) and
cluster mode for small ones (a few seeds stand for a whole visual concept), falling back to sample mode when no
cluster assignments are given. At most `cap_per_seed_set` images are selected per call (the highest scores).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from curate.embedding.rows import CHUNK_ROWS
from curate.knn.graph import as_float32, knn_search
from curate.knn.index import IndexConfig
from curate.selection.cluster import rank_within_groups

if TYPE_CHECKING:
    from curate.embedding.rows import EmbeddingRows

log = logging.getLogger(__name__)

MODES = ("auto", "sample", "cluster")


@dataclass
class RetrieveConfig:
    """Retrieval options for one seed set (DINOv2-style defaults)."""

    mode: str = "auto"  # auto | sample | cluster
    n_per_seed: int = 4  # sample mode: nearest pool images per seed image
    m_per_cluster: int = 10000  # cluster mode: pool images taken from each cluster holding enough seeds
    min_seeds_per_cluster: int = 3  # cluster mode: a cluster qualifies with MORE than this many seed images
    cap_per_seed_set: int = 1_000_000  # most images one seed set may select (highest scores kept)
    auto_threshold: int = 1_000_000  # auto: sample mode for seed sets at least this large, else cluster mode
    cluster_level: int = 1  # the (1-based) k-means level of the assignments passed to `retrieve`, for the reason
    use_gpu: str = "auto"  # faiss on GPU: auto (when present) | gpu | cpu

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"retrieve.mode={self.mode!r}: use one of {', '.join(MODES)}")
        for key in ("n_per_seed", "m_per_cluster", "cap_per_seed_set", "cluster_level"):
            if getattr(self, key) < 1:
                raise ValueError(f"retrieve.{key}={getattr(self, key)}: must be >= 1")
        if self.min_seeds_per_cluster < 0:
            raise ValueError(f"retrieve.min_seeds_per_cluster={self.min_seeds_per_cluster}: must be >= 0")


def resolve_mode(cfg: RetrieveConfig, n_seeds: int, have_clusters: bool) -> str:
    """The concrete mode (sample or cluster) for a seed set of `n_seeds` images."""
    if cfg.mode == "cluster" and not have_clusters:
        raise ValueError("retrieve.mode=cluster needs cluster assignments of the pool and the seeds: run the cluster "
                         "step first (or use mode=sample)")
    if cfg.mode != "auto":
        return cfg.mode
    if n_seeds >= cfg.auto_threshold:
        return "sample"
    if not have_clusters:
        log.warning("retrieve: auto mode would use cluster retrieval for %d seeds (< auto_threshold=%d) but no "
                    "cluster assignments were given; using sample retrieval", n_seeds, cfg.auto_threshold)
        return "sample"
    return "cluster"


def _first_per_group(group: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Positions of the best-scoring entry of every group value."""
    order = np.lexsort((-score, group))
    first = np.ones(len(order), dtype=bool)
    first[1:] = group[order][1:] != group[order][:-1]
    return order[first]


def sample_retrieval(pool_emb: np.ndarray | EmbeddingRows, seed_emb: np.ndarray, n_per_seed: int,
                     use_gpu: bool | str = "auto", index_cfg: IndexConfig | None = None,
                     pool_shards: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool rows selected, index of the seed that brought each (the most similar), similarity), by pool row.

    `index_cfg`: how the pool is indexed (`curate.knn.index`; None: flat, exact); `pool_shards`: row arrays
    partitioning the pool, indexed one at a time (the same result, the memory of one shard)."""
    sims, ids = knn_search(pool_emb, seed_emb, n_per_seed, use_gpu=use_gpu, index_cfg=index_cfg, what="retrieval",
                           shards=pool_shards)
    seed_of = np.repeat(np.arange(len(seed_emb)), sims.shape[1])
    rows, sims = ids.ravel(), sims.ravel()
    valid = rows >= 0
    rows, sims, seed_of = rows[valid], sims[valid], seed_of[valid]
    best = _first_per_group(rows, sims)
    order = np.argsort(rows[best], kind="stable")
    best = best[order]
    return rows[best], seed_of[best], sims[best]


def cluster_retrieval(pool_emb: np.ndarray | EmbeddingRows, seed_emb: np.ndarray, pool_assign: np.ndarray,
                      seed_assign: np.ndarray, m_per_cluster: int,
                      min_seeds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool rows selected, their cluster, similarity to the cluster's mean seed), by pool row.

    Qualifying clusters hold more than `min_seeds` seed images; each gives its `m_per_cluster` pool images most
    similar to the normalised mean of those seeds.
    """
    pool_assign = np.asarray(pool_assign, dtype=np.int64)
    seed_assign = np.asarray(seed_assign, dtype=np.int64)
    if len(pool_assign) != len(pool_emb) or len(seed_assign) != len(seed_emb):
        raise ValueError(f"assignments must align with embeddings: pool {len(pool_assign)} vs {len(pool_emb)}, "
                         f"seeds {len(seed_assign)} vs {len(seed_emb)}")
    n_clusters = int(max(pool_assign.max(initial=-1), seed_assign.max(initial=-1))) + 1
    counts = np.bincount(seed_assign, minlength=n_clusters)
    qualifying = counts > min_seeds
    seed_mean = np.zeros((n_clusters, pool_emb.shape[1]), dtype=np.float64)
    np.add.at(seed_mean, seed_assign, seed_emb)
    seed_mean /= np.maximum(np.linalg.norm(seed_mean, axis=1, keepdims=True), 1e-12)
    rows = np.nonzero(qualifying[pool_assign])[0]
    clusters = pool_assign[rows]
    seed_mean = seed_mean.astype(np.float32)
    sims = np.full(len(rows), np.nan, dtype=np.float32)  # a row a chunk missed would show
    for start in range(0, len(rows), CHUNK_ROWS):  # the pool's rows read and converted a chunk at a time
        at = slice(start, start + CHUNK_ROWS)
        sims[at] = np.einsum("nd,nd->n", as_float32(pool_emb[rows[at]], "pool embeddings"), seed_mean[clusters[at]])
    order = np.lexsort((-sims, clusters))  # clusters together, most similar to the seeds' mean first
    keep = np.sort(order[rank_within_groups(clusters[order]) < m_per_cluster])
    log.info("cluster retrieval: %d of %d seeded clusters hold > %d seeds; %d pool images", int(qualifying.sum()),
             int((counts > 0).sum()), min_seeds, len(keep))
    return rows[keep], clusters[keep], sims[keep]


def retrieve(pool_emb: np.ndarray | EmbeddingRows, seed_emb: np.ndarray, seed_uids: Sequence[str],
             pool_assign: np.ndarray | None = None, seed_assign: np.ndarray | None = None,
             cfg: RetrieveConfig | None = None, index_cfg: IndexConfig | None = None,
             pool_shards: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """Pool images selected for one seed set: (mask bool [N], reason per row or None, score float32 [N], NaN if not
    selected). Reasons: `seed:<uid>` (sample mode) or `cluster:<level>/<id>` (cluster mode). `index_cfg`: how sample
    mode indexes the pool (None: flat, exact); `pool_shards`: row arrays partitioning the pool, for an index that
    holds one at a time."""
    cfg = cfg or RetrieveConfig()
    pool_emb = pool_emb if hasattr(pool_emb, "shape") else np.asarray(pool_emb)  # read by rows, never whole
    if len(pool_emb.shape) != 2:
        raise ValueError(f"pool embeddings must be a 2-D array [n, dim], got shape {pool_emb.shape}")
    seed_emb = as_float32(seed_emb, "seed embeddings")
    if len(seed_uids) != len(seed_emb):
        raise ValueError(f"{len(seed_uids)} seed uids for {len(seed_emb)} seed embeddings")
    n = len(pool_emb)
    mask = np.zeros(n, dtype=bool)
    score = np.full(n, np.nan, dtype=np.float32)
    reasons: list[str | None] = [None] * n
    if n == 0 or len(seed_emb) == 0:
        return mask, reasons, score
    mode = resolve_mode(cfg, len(seed_emb), pool_assign is not None and seed_assign is not None)
    if mode == "sample":
        rows, seed_of, sims = sample_retrieval(pool_emb, seed_emb, cfg.n_per_seed, cfg.use_gpu, index_cfg,
                                               pool_shards)
        labels = [f"seed:{seed_uids[s]}" for s in seed_of.tolist()]
    else:
        rows, cluster_of, sims = cluster_retrieval(pool_emb, seed_emb, pool_assign, seed_assign, cfg.m_per_cluster,
                                                   cfg.min_seeds_per_cluster)
        labels = [f"cluster:{cfg.cluster_level}/{c}" for c in cluster_of.tolist()]
    if len(rows) > cfg.cap_per_seed_set:
        top = np.sort(np.argsort(-sims, kind="stable")[:cfg.cap_per_seed_set])
        log.info("retrieve: %d images over cap_per_seed_set=%d; keeping the most similar", len(rows),
                 cfg.cap_per_seed_set)
        rows, sims, labels = rows[top], sims[top], [labels[t] for t in top.tolist()]
    mask[rows] = True
    score[rows] = sims
    for r, label in zip(rows.tolist(), labels, strict=True):
        reasons[r] = label
    log.info("retrieve (%s mode): %d seeds -> %d of %d pool images", mode, len(seed_emb), len(rows), n)
    return mask, reasons, score
