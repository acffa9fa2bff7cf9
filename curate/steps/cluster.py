"""The cluster step: hierarchical k-means over the deduplicated pool (Vo et al. 2024); seed images get the clusters of
their nearest centroids."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from curate.errors import CurateError
from curate.manifest import (
    CLUSTER_PREFIX,
    cluster_columns,
    drop_columns,
    mask_of,
    read_manifest,
    set_columns,
    write_manifest,
)
from curate.steps.embed import embedding_store
from dinoforge.atomic import atomic_write, atomic_write_json

if TYPE_CHECKING:
    from curate.config import CurateConfig
    from curate.steps.runner import StepContext


def config(cfg: CurateConfig) -> dict:
    return dataclasses.asdict(cfg.cluster)


def run(cfg: CurateConfig, context: StepContext) -> dict:
    """Cluster the pool; write clusters/levelN_centroids.npy and the manifest's cluster_lN columns."""
    from curate.selection.cluster import assign_to_centroids, hierarchical_kmeans, parent_clusters  # faiss

    rundir = context.rundir
    table = read_manifest(rundir.manifest)
    table = drop_columns(table, cluster_columns(table))
    store = embedding_store(rundir, cfg)
    uid_col = table.column("uid").to_pylist()
    pool = np.nonzero(mask_of(table, "pool", ["ok", "selected", "not_selected"]))[0]
    seeds = np.nonzero(mask_of(table, "seed", ["ok"]))[0]
    if pool.size == 0:
        raise CurateError("nothing to cluster: no pool image survived ingest and dedup (see the manifest's "
                          "status and reason columns)")
    emb = store.gather([uid_col[i] for i in pool]).astype(np.float32)
    hierarchy = hierarchical_kmeans(emb, cfg.cluster)
    seed_assign = None
    if seeds.size:  # seeds follow the hierarchy from their nearest finest-level centroid upwards
        seed_emb = store.gather([uid_col[i] for i in seeds]).astype(np.float32)
        seed_assign = [assign_to_centroids(seed_emb, hierarchy[0].centroids, cfg.cluster.use_gpu)]
        for level in range(len(hierarchy) - 1):
            seed_assign.append(parent_clusters(hierarchy, level, cfg.cluster.use_gpu)[seed_assign[-1]])
    rundir.clusters.mkdir(parents=True, exist_ok=True)
    columns = {}
    for level, (centroids, assign) in enumerate(hierarchy):
        centroids = np.asarray(centroids, dtype=np.float32)
        atomic_write(rundir.clusters / f"level{level + 1}_centroids.npy", lambda fh, c=centroids: np.save(fh, c))
        col = np.full(table.num_rows, -1, dtype=np.int64)
        col[pool] = assign
        if seed_assign is not None:
            col[seeds] = seed_assign[level]
        columns[f"{CLUSTER_PREFIX}{level + 1}"] = pa.array(col, type=pa.int32(), mask=col < 0)
    table = set_columns(table, columns)
    write_manifest(table, rundir.manifest)
    summary = {"levels": len(hierarchy), "clusters_per_level": [int(len(c)) for c, _ in hierarchy],
               "points": int(len(pool)), "max_points_per_centroid": cfg.cluster.max_points_per_centroid}
    atomic_write_json(rundir.clusters / "summary.json", summary)
    return summary
