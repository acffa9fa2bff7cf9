"""Spherical k-means (faiss), hierarchical k-means with resampling (Vo et al. 2024), and balanced sampling.

Hierarchical k-means (Vo et al. 2024, "Automatic data curation for self-supervised learning: a clustering-based
approach"): level 1 clusters the points, level l+1 clusters the centroids of level l. Plain k-means puts most
centroids where the data is dense (the head of the distribution); the resampling refinement re-runs k-means, at a
level, on a balanced sample of its inputs (the `sample_size` inputs closest to each current centroid), then
re-assigns every input to the new centroids. Repeating this moves centroids toward a uniform cover of the data's
support, so sampling evenly across clusters yields a dataset balanced across concepts.

`max_points_per_centroid` caps the k-means training set at k x that many points (faiss samples them with the
seed): it bounds time and memory on a billion points and is logged at every call, since it trades centroid quality
for speed. All inputs are then assigned to the trained centroids in chunks of `CHUNK_ROWS`, each converted to float32
alone.

A hierarchy is a list of `KMeansLevel(centroids, assign)`, finest level first, where `assign` gives the level's
cluster of every original point (not of the level's inputs), so levels can be read independently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from curate.embedding.rows import CHUNK_ROWS
from curate.knn.faiss_device import resolve_use_gpu
from curate.knn.graph import as_float32, knn_search

log = logging.getLogger(__name__)
# faiss is imported where it is called: curation's config imports this module, and ingest runs without faiss.

SAMPLING_STRATEGIES = ("closest", "random")


@dataclass
class ClusterConfig:
    """Hierarchical k-means options; lists hold one value per level, finest level first."""

    n_clusters: list[int] = field(default_factory=lambda: [100, 10])
    n_iter: int = 20  # Lloyd iterations per k-means run
    n_redo: int = 1  # k-means runs from different seeds per fit; the best objective is kept
    seed: int = 0
    max_points_per_centroid: int = 256  # k-means trains on at most k * this many points (sampled with the seed)
    resampling_steps: list[int] = field(default_factory=lambda: [0, 10])  # Vo et al.: none at the first level
    sample_size: list[int] = field(default_factory=lambda: [1, 5])  # inputs per cluster in a resampling step
    sampling: str = "closest"  # which inputs a resampling step takes from each cluster: closest | random
    use_gpu: str = "auto"  # faiss on GPU: auto (when present) | gpu | cpu

    def __post_init__(self) -> None:
        n = len(self.n_clusters)
        if n == 0 or any(k < 1 for k in self.n_clusters):
            raise ValueError(f"cluster.n_clusters={self.n_clusters}: give one cluster count >= 1 per level")
        for key in ("resampling_steps", "sample_size"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"cluster.{key}={getattr(self, key)}: needs one value per level ({n} levels, as "
                                 f"in cluster.n_clusters)")
        if self.sampling not in SAMPLING_STRATEGIES:
            raise ValueError(f"cluster.sampling={self.sampling!r}: use one of {', '.join(SAMPLING_STRATEGIES)}")
        if self.n_iter < 1 or self.n_redo < 1 or self.max_points_per_centroid < 1:
            raise ValueError("cluster.n_iter, cluster.n_redo and cluster.max_points_per_centroid must be >= 1")


class KMeansLevel(NamedTuple):
    """One level of a hierarchy: unit-norm centroids [k, d] and the cluster of every original point [n]."""

    centroids: np.ndarray
    assign: np.ndarray


def assign_to_centroids(x: np.ndarray, centroids: np.ndarray, use_gpu: bool | str = "auto") -> np.ndarray:
    """Index of the most similar centroid (cosine) for every row of `x`, searched `CHUNK_ROWS` rows at a time (only
    a chunk is ever converted to float32: `x` may be float16, or `curate.embedding.rows.EmbeddingRows`)."""
    assign = np.zeros(len(x), dtype=np.int64)
    for start in range(0, len(x), CHUNK_ROWS):
        chunk = as_float32(x[start:start + CHUNK_ROWS], "k-means input")
        assign[start:start + len(chunk)] = knn_search(centroids, chunk, 1, use_gpu=use_gpu, progress=False)[1][:, 0]
    return assign


def similarity_to_assigned(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """Cosine of every row of `x` to its assigned centroid, `CHUNK_ROWS` rows at a time."""
    sims = np.zeros(len(x), dtype=np.float32)
    for start in range(0, len(x), CHUNK_ROWS):
        chunk = as_float32(x[start:start + CHUNK_ROWS], "k-means input")
        sims[start:start + len(chunk)] = np.einsum("nd,nd->n", chunk, centroids[assign[start:start + len(chunk)]])
    return sims


def training_sample(n: int, k: int, max_points_per_centroid: int, seed: int) -> np.ndarray:
    """Sorted rows k-means trains on: all n, or a seeded sample of k * max_points_per_centroid of them."""
    size = k * max_points_per_centroid
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def spherical_kmeans(x: np.ndarray, k: int, n_iter: int = 20, seed: int = 0, max_points_per_centroid: int = 256,
                     use_gpu: bool | str = "auto", n_redo: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """faiss spherical k-means of the rows of `x`: (unit-norm centroids float32 [k, d], assignment int64 [n]).

    `k` larger than the number of rows is lowered to it (with a warning); faiss needs a point per centroid.
    """
    import faiss
    x = x if hasattr(x, "shape") else np.asarray(x)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"k-means needs a non-empty [n, dim] array, got shape {x.shape}")
    n, d = x.shape
    if k > n:
        log.warning("k-means: k=%d > %d points; using k=%d", k, n, n)
        k = n
    on_gpu = resolve_use_gpu(use_gpu)
    rows = training_sample(n, k, max_points_per_centroid, seed)
    log.info("k-means: k=%d on %d points (d=%d), max_points_per_centroid=%d -> training on %d points, %d iterations"
             ", seed %d, %s", k, n, d, max_points_per_centroid, len(rows), n_iter, seed, "GPU" if on_gpu else "CPU")
    km = faiss.Kmeans(d, k, niter=n_iter, nredo=n_redo, seed=seed, spherical=True,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1, gpu=on_gpu,
                      verbose=False)
    # Only the training sample is converted to float32: the full float16 pool may not fit in memory as float32.
    km.train(as_float32(x[rows], "k-means input"))
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return centroids, assign_to_centroids(x, centroids, on_gpu)


def balanced_subset(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray, per_cluster: int,
                    strategy: str = "closest", rng: np.random.Generator | None = None) -> np.ndarray:
    """Rows of `x`: up to `per_cluster` per cluster, those closest to their centroid or drawn at random."""
    if strategy == "closest":
        key = -similarity_to_assigned(x, centroids, assign)
    elif strategy == "random":
        key = (rng or np.random.default_rng(0)).random(len(x))
    else:
        raise ValueError(f"sampling strategy {strategy!r}: use one of {', '.join(SAMPLING_STRATEGIES)}")
    order = np.lexsort((key, assign))
    return np.sort(order[rank_within_groups(assign[order]) < per_cluster])


def rank_within_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """0, 1, 2... within each run of equal values of an already grouped array."""
    n = len(sorted_groups)
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n) - first


def _resampled_kmeans(x: np.ndarray, k: int, cfg: ClusterConfig, level: int) -> tuple[np.ndarray, np.ndarray]:
    """One level: k-means, then `resampling_steps` rounds of k-means on a balanced sample + full re-assignment."""
    centroids, assign = spherical_kmeans(x, k, cfg.n_iter, cfg.seed + 1000 * level, cfg.max_points_per_centroid,
                                         cfg.use_gpu, cfg.n_redo)
    k = len(centroids)
    steps, per_cluster = cfg.resampling_steps[level], cfg.sample_size[level]
    if steps <= 0 or per_cluster <= 1:
        return centroids, assign
    rng = np.random.default_rng(cfg.seed + level)
    for step in range(steps):
        rows = balanced_subset(x, centroids, assign, per_cluster, cfg.sampling, rng)
        if len(rows) < k:
            log.warning("level %d resampling: %d sampled inputs < k=%d; stopping after %d steps", level + 1,
                        len(rows), k, step)
            break
        log.info("level %d resampling step %d/%d: k-means on %d inputs (%d per cluster, %s)", level + 1, step + 1,
                 steps, len(rows), per_cluster, cfg.sampling)
        centroids, _ = spherical_kmeans(x[rows], k, cfg.n_iter, cfg.seed + 1000 * level + step + 1,
                                        cfg.max_points_per_centroid, cfg.use_gpu, cfg.n_redo)
        assign = assign_to_centroids(x, centroids, cfg.use_gpu)
    return centroids, assign


def hierarchical_kmeans(x: np.ndarray, cfg: ClusterConfig) -> list[KMeansLevel]:
    """Hierarchical k-means of the rows of `x`, finest level first; `assign` is per original point at every level.

    `x` may be a lazy view of the embeddings (`curate.embedding.rows.EmbeddingRows`): each level trains on a sample
    and assigns every point in chunks, so the points are never all in memory as float32."""
    x = x if hasattr(x, "shape") else np.asarray(x)
    levels: list[KMeansLevel] = []
    inputs, point_to_input = x, np.arange(len(x), dtype=np.int64)
    for level, k in enumerate(cfg.n_clusters):
        centroids, input_assign = _resampled_kmeans(inputs, k, cfg, level)
        point_assign = input_assign[point_to_input]
        sizes = np.bincount(point_assign, minlength=len(centroids))
        log.info("level %d: %d clusters, points per cluster min %d / median %d / max %d, %d empty", level + 1,
                 len(centroids), sizes.min(), int(np.median(sizes)), sizes.max(), int((sizes == 0).sum()))
        levels.append(KMeansLevel(centroids, point_assign))
        inputs, point_to_input = centroids, point_assign
    return levels


def parent_clusters(hierarchy: list[KMeansLevel], level: int, use_gpu: bool | str = "auto") -> np.ndarray:
    """For every cluster of `level` (0-based), its cluster at `level + 1`: the nearest coarser centroid, which is how
    `hierarchical_kmeans` assigns a level's centroids (so a cluster that lost all its points has a parent too)."""
    return assign_to_centroids(hierarchy[level].centroids, hierarchy[level + 1].centroids, use_gpu)


def water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Integer counts <= sizes summing to min(target, sizes.sum()), as equal as the sizes allow.

    Every group gets min(size, cap) for the largest cap that fits; the few units left go to randomly chosen groups
    still above the cap (Vo et al.'s balanced sampling).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if target >= sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())  # sum(min(sizes, lo)) <= target < sum(min(sizes, hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid
    counts = np.minimum(sizes, lo)
    remainder = int(target - counts.sum())
    if remainder:
        above = np.nonzero(sizes > lo)[0]
        counts[rng.choice(above, remainder, replace=False)] += 1
    return counts


def balanced_sample(hierarchy: list[KMeansLevel] | list[tuple[np.ndarray, np.ndarray]], n: int, seed: int = 0,
                    x: np.ndarray | None = None, strategy: str = "random") -> np.ndarray:
    """Indices (sorted) of `n` points drawn evenly across the hierarchy, top level down.

    The budget is split as evenly as the cluster sizes allow among the top-level clusters, then within each among
    its children, down to the finest clusters, whose points are drawn at random (seeded) or, with `x` and
    `strategy="closest"`, closest to their centroid first.
    """
    hierarchy = [KMeansLevel(np.asarray(c), np.asarray(a, dtype=np.int64)) for c, a in hierarchy]
    if not hierarchy:
        raise ValueError("balanced_sample needs at least one clustering level")
    n_points = len(hierarchy[0].assign)
    if n >= n_points:
        return np.arange(n_points, dtype=np.int64)
    rng = np.random.default_rng(seed)
    top = hierarchy[-1]
    target = water_fill(np.bincount(top.assign, minlength=len(top.centroids)), n, rng)
    for level in range(len(hierarchy) - 2, -1, -1):
        child = hierarchy[level]
        child_sizes = np.bincount(child.assign, minlength=len(child.centroids))
        parent = parent_clusters(hierarchy, level)
        child_target = np.zeros(len(child.centroids), dtype=np.int64)
        by_parent = np.argsort(parent, kind="stable")  # children grouped by parent, one slice per parent
        bounds = np.searchsorted(parent[by_parent], np.arange(len(target) + 1))
        for p in np.nonzero(target)[0]:
            kids = by_parent[bounds[p]:bounds[p + 1]]
            child_target[kids] = water_fill(child_sizes[kids], int(target[p]), rng)
        target = child_target
    finest = hierarchy[0]
    if strategy == "closest":
        if x is None:
            raise ValueError("strategy='closest' needs the points x")
        key = -similarity_to_assigned(x, finest.centroids, finest.assign)
    elif strategy == "random":
        key = rng.random(n_points)
    else:
        raise ValueError(f"strategy={strategy!r}: use one of {', '.join(SAMPLING_STRATEGIES)}")
    order = np.lexsort((key, finest.assign))
    picked = order[rank_within_groups(finest.assign[order]) < target[finest.assign[order]]]
    return np.sort(picked).astype(np.int64)
