"""The cluster step: hierarchical k-means over the deduplicated pool (Vo et al. 2024); seed images get the clusters of
their nearest centroids."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from curate.embedding.rows import manifest_rows
from curate.errors import CurateError
from curate.manifest import CLUSTER_PREFIX, cluster_columns, drop_columns, mask_of, read_manifest, set_columns
from curate.manifest_files import rewrite_partitions
from curate.steps.embed import embedding_store
from dinoforge.atomic import atomic_write, atomic_write_json

if TYPE_CHECKING:
    from curate.config import CurateConfig
    from curate.steps.runner import StepContext


def config(cfg: CurateConfig) -> dict:
    return dataclasses.asdict(cfg.cluster)


def run(cfg: CurateConfig, context: StepContext) -> dict:
    """Cluster the pool; write clusters/levelN_centroids.npy and the manifest's cluster_lN columns.

    The pool's embeddings stay in the store's memory maps (`curate.embedding.rows`): k-means trains each level on a
    sample and assigns every point in chunks, and the manifest is rewritten one partition at a time."""
    from curate.selection.cluster import assign_to_centroids, hierarchical_kmeans, parent_clusters  # faiss

    rundir = context.rundir
    table = read_manifest(rundir.manifest, ["uid", "role", "status", "partition"])
    store = embedding_store(rundir, cfg)
    pool = mask_of(table, "pool", ["ok", "selected", "not_selected"])
    seeds = mask_of(table, "seed", ["ok"])
    if not pool.any():
        raise CurateError("nothing to cluster: no pool image survived ingest and dedup (see the manifest's "
                          "status and reason columns)")
    hierarchy = hierarchical_kmeans(manifest_rows(store, table, pool), cfg.cluster)
    seed_assign = None
    if seeds.any():  # seeds follow the hierarchy from their nearest finest-level centroid upwards
        seed_emb = manifest_rows(store, table, seeds)
        seed_assign = [assign_to_centroids(seed_emb, hierarchy[0].centroids, cfg.cluster.use_gpu)]
        for level in range(len(hierarchy) - 1):
            seed_assign.append(parent_clusters(hierarchy, level, cfg.cluster.use_gpu)[seed_assign[-1]])
    rundir.clusters.mkdir(parents=True, exist_ok=True)
    levels = []
    for level, (centroids, assign) in enumerate(hierarchy):
        centroids = np.asarray(centroids, dtype=np.float32)
        atomic_write(rundir.clusters / f"level{level + 1}_centroids.npy", lambda fh, c=centroids: np.save(fh, c))
        col = np.full(table.num_rows, -1, dtype=np.int32)  # manifest order: what the partitions read back in
        col[pool] = assign
        if seed_assign is not None:
            col[seeds] = seed_assign[level]
        levels.append(col)

    def with_clusters(part: pa.Table, rows: slice) -> pa.Table:
        part = drop_columns(part, cluster_columns(part))
        return set_columns(part, {f"{CLUSTER_PREFIX}{level + 1}": pa.array(col[rows], mask=col[rows] < 0)
                                  for level, col in enumerate(levels)})

    rewrite_partitions(rundir.manifest, with_clusters)
    summary = {"levels": len(hierarchy), "clusters_per_level": [int(len(c)) for c, _ in hierarchy],
               "points": int(pool.sum()), "max_points_per_centroid": cfg.cluster.max_points_per_centroid}
    atomic_write_json(rundir.clusters / "summary.json", summary)
    return summary
