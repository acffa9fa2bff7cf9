"""Our spherical k-means vs bare `faiss.Kmeans` on the same data; prints one JSON object.

Both train with the same k, iterations, seed and `max_points_per_centroid`, then assign every point to its nearest
centroid, so the ratio measures our wrapper's overhead (float16 -> float32, chunked assignment, logging). The
hierarchical k-means with resampling (Vo et al. 2024) is timed too, for information: it does more work by design.

    python bench/bench_kmeans.py --n 200000 --k 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.headline import headline  # noqa: E402
from bench.timing import Clock  # noqa: E402
from curate.knn.graph import resolve_use_gpu  # noqa: E402
from curate.selection.cluster import ClusterConfig, hierarchical_kmeans, spherical_kmeans  # noqa: E402


def make_data(n: int, d: int, seed: int) -> np.ndarray:
    """float16 unit rows around n // 50 centres (8x the default k), so k-means has structure to find."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), d), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def bare_faiss(x16: np.ndarray, k: int, n_iter: int, seed: int, mppc: int, use_gpu: bool) -> tuple[float, float]:
    """(wall, cpu) seconds: faiss.Kmeans training (it samples k * mppc points itself), then assignment of all."""
    x = np.ascontiguousarray(x16, dtype=np.float32)  # faiss needs float32; the conversion is not timed
    clock = Clock()
    km = faiss.Kmeans(x.shape[1], k, niter=n_iter, seed=seed, spherical=True, max_points_per_centroid=mppc,
                      gpu=use_gpu, verbose=False)
    km.train(x)
    km.index.search(x, 1)
    return clock.read()


def ours(x16: np.ndarray, k: int, n_iter: int, seed: int, mppc: int, use_gpu: bool) -> tuple[float, float]:
    """(wall, cpu) seconds of `spherical_kmeans` on the float16 data (it samples, converts and assigns itself)."""
    clock = Clock()
    spherical_kmeans(x16, k, n_iter=n_iter, seed=seed, max_points_per_centroid=mppc, use_gpu=use_gpu)
    return clock.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--n-iter", type=int, default=20)
    parser.add_argument("--max-points-per-centroid", type=int, default=256)
    parser.add_argument("--levels", default="500,50", help="hierarchical k-means clusters per level")
    parser.add_argument("--use-gpu", default="auto", help="auto | gpu | cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating; the fastest counts")
    args = parser.parse_args()

    use_gpu = resolve_use_gpu(args.use_gpu)
    x16 = make_data(args.n, args.d, args.seed)
    params = (args.k, args.n_iter, args.seed, args.max_points_per_centroid, use_gpu)
    bare, mine = [], []
    for _ in range(args.repeats):
        bare.append(bare_faiss(x16, *params))
        mine.append(ours(x16, *params))
    levels = [int(v) for v in args.levels.split(",")]
    cfg = ClusterConfig(n_clusters=levels, n_iter=args.n_iter, seed=args.seed,
                        max_points_per_centroid=args.max_points_per_centroid,
                        resampling_steps=[0] + [10] * (len(levels) - 1), sample_size=[1] + [5] * (len(levels) - 1),
                        use_gpu="gpu" if use_gpu else "cpu")
    start = time.perf_counter()
    hierarchical_kmeans(x16, cfg)
    hier = time.perf_counter() - start
    bare_wall, bare_cpu = min(b[0] for b in bare), min(b[1] for b in bare)
    mine_wall, mine_cpu = min(m[0] for m in mine), min(m[1] for m in mine)
    ratio = mine_wall / bare_wall
    print(json.dumps({
        "bench": "kmeans", "n": args.n, "d": args.d, "k": args.k, "n_iter": args.n_iter,
        "max_points_per_centroid": args.max_points_per_centroid, "device": "gpu" if use_gpu else "cpu",
        "faiss_threads": faiss.omp_get_max_threads(), "repeats": args.repeats,
        "bare_faiss_kmeans_s": round(bare_wall, 3), "spherical_kmeans_s": round(mine_wall, 3),
        "bare_runs_s": [round(v[0], 3) for v in bare], "ours_runs_s": [round(v[0], 3) for v in mine],
        "bare_faiss_kmeans_cpu_s": round(bare_cpu, 3), "spherical_kmeans_cpu_s": round(mine_cpu, 3),
        "ratio_ours_over_bare": round(ratio, 3), "ratio_cpu_time": round(mine_cpu / bare_cpu, 3),
        "hierarchical_levels": levels, "hierarchical_resampling_steps": cfg.resampling_steps,
        "hierarchical_kmeans_s": round(hier, 3), "ratio_hierarchical_over_bare": round(hier / bare_wall, 3),
        "headline": headline(f"spherical_kmeans time / bare faiss.Kmeans time, n={args.n} k={args.k} (lower is "
                             "better: our wrapper's overhead)", ratio, "bare faiss.Kmeans, same data and settings"),
    }))


if __name__ == "__main__":
    main()
