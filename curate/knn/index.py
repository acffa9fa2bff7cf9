"""The nearest-neighbour index of curation: exact (flat) or approximate (IVF, IVF-PQ), chosen by one `index:` config.

Dedup's kNN graph, decontamination and retrieval all search through `build_index`, so one config section
(`index.kind=auto|flat|ivf|ivfpq`, `index.nlist`, `index.nprobe`, `index.pq_m`) decides how all three search.
Embeddings are L2-normalised, so the inner product is the cosine similarity, as in the flat index.

- flat: exact, every query against every row; cost n_queries * n.
- ivf: an inverted file (Jegou et al. 2011): spherical k-means cells (`nlist`) trained on a seeded sample, each row
  stored in its nearest cell, a query scanning its `nprobe` nearest cells. Similarities are exact for the rows it
  sees; it only misses neighbours that fall in cells it does not scan. Cost n_queries * (nlist + nprobe * n / nlist).
  Rows are stored in the database's own precision: float16 embeddings (the store's) as float16 (faiss's fp16 scalar
  quantizer, lossless for them, half the memory of float32), anything else as float32.
- ivfpq: the same cells, rows stored as `pq_m`-byte product-quantised codes (memory / 4 * dim / pq_m); candidates
  are re-ranked with the exact inner product, so the similarities compared with a threshold are exact.
- auto: flat below `auto_threshold` rows, where exact search is cheap and IVF's training would cost more than it
  saves, else ivf (see docs/curation.md for the measurements behind the default).

The database may be any 2-D array-like that is indexed by row arrays and slices and has `shape` and `dtype` (e.g.
`curate.embedding.rows.EmbeddingRows` over the store's memory maps): it is read `ADD_CHUNK` rows at a time, so no
float32 copy of the whole database is ever made beside the index.

Given shards (row arrays partitioning the database, e.g. one per manifest partition), `build_index` returns a
`ShardedIndex`: one shard in the index at a time, the shards' results merged per query, with the same neighbours as
one index of every row (the IVF cells are shared), so a task's index memory is a shard's, not the database's.

Results are deterministic: the training sample is drawn with `seed`, faiss's k-means is seeded, and rows are added
in a fixed order (shard by shard). faiss runs on the GPU when `curate.knn.faiss_device` says it can
(the GPU IVF path is not covered by the CPU test suite).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from curate.knn.faiss_device import resolve_use_gpu, to_all_gpus
from dinoforge.atomic import atomic_write_bytes
from dinoforge.config import ConfigError

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)
# faiss is imported where it is called: curation's config imports this module, and ingest runs without faiss.

INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq")
GPU_MAX_K = 2048  # faiss GPU search supports k <= 2048 (and nprobe <= 2048)
# Exact search below this many rows: on 2 CPU cores the exact graph of 10^5 x 256 takes ~200 s and IVF 0.22-0.34
# of it; below ~5 * 10^4 exact costs under a minute and IVF's training would eat most of the saving (docs/curation.md).
AUTO_THRESHOLD = 50_000
NLIST_PER_SQRT_N = 4  # nlist = 4 sqrt(n): faiss's guideline (4-16 sqrt(n)) at its cheapest training end
DEFAULT_NPROBE = 64  # full-graph recall 1.000 of planted copies at 10^5 and 10^6 x 256 clustered (docs/curation.md)
TRAIN_PER_CELL = 64  # k-means sample per cell: faiss warns under 39; 64 gave better recall than 32 at 10^5
TRAIN_ITERATIONS = 10  # k-means iterations, not faiss's 25: training dominates IVF's cost, recall met at 10
PQ_BITS = 8  # bits per sub-quantizer code: one byte, the only size every faiss GPU IVF-PQ kernel supports
RERANK_FACTOR = 2  # ivfpq: candidates per wanted neighbour, re-ranked with exact inner products
RERANK_CHUNK = 1024  # queries re-ranked at once: [1024, 2k, dim] float32, ~130 MB at k=64, dim=256
ADD_CHUNK = 1 << 16  # database rows converted to float32 and added at a time: 64 MB at dim 256
MERGE_CHUNK = 1 << 14  # queries whose shard results are merged at a time: [16384, 2k] candidates, ~27 MB at k=65


@dataclass
class IndexConfig:
    """How curation's kNN searches index their database (dedup graph, decontamination, retrieval)."""

    kind: str = "auto"  # auto | flat | ivf | ivfpq
    nlist: int = 0  # IVF cells; 0: 4 * sqrt(rows), at most the rows
    nprobe: int = 0  # cells scanned per query (recall against time); 0: 64, or every cell when there are fewer
    pq_m: int = 0  # ivfpq: bytes per row code (sub-quantizers), must divide the embedding dim; 0: dim / 4
    train_sample: int = 0  # rows the IVF cells are trained on (a seeded sample); 0: 64 per cell
    auto_threshold: int = AUTO_THRESHOLD  # auto: flat below this many rows, ivf from it on
    seed: int = 0  # draws the training sample and seeds k-means

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index.kind={self.kind!r}: use one of {', '.join(INDEX_KINDS)}")
        for key in ("nlist", "nprobe", "pq_m", "train_sample"):
            if getattr(self, key) < 0:
                raise ValueError(f"index.{key}={getattr(self, key)}: must be >= 0 (0: chosen from the data)")
        if self.auto_threshold < 1:
            raise ValueError(f"index.auto_threshold={self.auto_threshold}: must be >= 1")
        if self.nlist and self.nprobe > self.nlist:
            raise ValueError(f"index.nprobe={self.nprobe} exceeds index.nlist={self.nlist}: a query cannot scan more "
                             "cells than there are")


@dataclass(frozen=True)
class IndexPlan:
    """What `IndexConfig` means for a database of `rows` x `dim`: the kind and parameters actually used."""

    kind: str  # flat | ivf | ivfpq
    rows: int
    dim: int
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    train_rows: int = 0
    reason: str = ""
    fp16: bool = False  # ivf: rows stored as float16 (the database is float16, so nothing is lost)

    def as_dict(self) -> dict:
        return asdict(self)


def plan_index(cfg: IndexConfig | None, rows: int, dim: int, what: str = "index", fp16: bool = False) -> IndexPlan:
    """Resolve `cfg` for `rows` x `dim` (auto's choice, nlist and sample sizes); ConfigError naming the key when a set
    value cannot work for this database (`what` it indexes, for the message). None: flat (exact). `fp16`: the
    database is float16 (an ivf index then stores it as float16)."""
    if cfg is None:
        return IndexPlan("flat", rows, dim, reason="exact search (no index config)")
    if rows == 0:  # e.g. a pool that exact dedup or ingest emptied: nothing to train cells on
        return IndexPlan("flat", rows, dim, reason="no rows to index")
    kind = cfg.kind
    if kind == "auto":
        below = rows < cfg.auto_threshold
        kind = "flat" if below else "ivf"
        reason = f"auto: {rows} rows {'<' if below else '>='} index.auto_threshold={cfg.auto_threshold}"
    else:
        reason = f"index.kind={kind}"
    if kind == "flat":
        return IndexPlan("flat", rows, dim, reason=reason)
    if cfg.nlist > rows:
        raise ConfigError(f"index.nlist={cfg.nlist} exceeds the {rows} rows of the {what}: every cell needs a row")
    nlist = cfg.nlist or max(1, min(rows, round(NLIST_PER_SQRT_N * math.sqrt(rows))))
    # An explicit nprobe > nlist is refused by IndexConfig; against an automatic nlist, all cells is the most it means.
    nprobe = min(cfg.nprobe or DEFAULT_NPROBE, nlist)
    pq_m = 0
    if kind == "ivfpq":
        pq_m = cfg.pq_m or max(1, dim // 4)
        if dim % pq_m:
            raise ConfigError(f"index.pq_m={pq_m} does not divide the embedding dim {dim}: each code byte encodes "
                              f"an equal slice of the vector")
        if rows < 2**PQ_BITS:
            raise ConfigError(f"index.kind=ivfpq needs at least {2**PQ_BITS} rows to train its codebooks, the "
                              f"{what} has {rows}: use index.kind=flat or auto")
    train_rows = min(rows, cfg.train_sample or TRAIN_PER_CELL * nlist)
    if train_rows < nlist:
        raise ConfigError(f"index.train_sample={cfg.train_sample} is below index.nlist={nlist}: k-means needs a "
                          "training row per cell")
    if kind == "ivfpq":
        train_rows = max(train_rows, min(rows, 2**PQ_BITS * 39))  # faiss's PQ codebooks want >= 39 rows per code
    return IndexPlan(kind, rows, dim, nlist, nprobe, pq_m, train_rows, reason, fp16=fp16 and kind == "ivf")


def as_float32(x: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """A C-contiguous float32 [n, d] view or copy of `x` (faiss reads only float32)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def train_sample_rows(rows: int, size: int, seed: int) -> np.ndarray:
    """The sorted rows IVF trains on: all of them, or a seeded uniform sample of `size`."""
    if size >= rows:
        return np.arange(rows, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False)).astype(np.int64)


def _empty_index(plan: IndexPlan) -> faiss.Index:
    import faiss
    quantizer = faiss.IndexFlatIP(plan.dim)
    if plan.kind == "ivf" and plan.fp16:
        # by_residual off: the rows themselves are stored, and float16 rows exactly (a residual to the cell's centre
        # would be rounded to float16)
        index = faiss.IndexIVFScalarQuantizer(quantizer, plan.dim, plan.nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT, False)
    elif plan.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, plan.dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, plan.dim, plan.nlist, plan.pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True  # unit vectors: centroids renormalised, cells by inner product
    index.cp.niter = TRAIN_ITERATIONS
    return index


def train_ivf(xb: np.ndarray, plan: IndexPlan, seed: int = 0, cache: Path | None = None) -> faiss.Index:
    """An empty, trained CPU IVF index for `plan`, its cells trained on a seeded sample of `xb`.

    `cache`: a file holding the trained index; read when present, else written (atomically) after training, so the
    array tasks of one step train once (tasks racing to train compute the same index: the sample and k-means are
    seeded).
    """
    import faiss
    if cache is not None and cache.is_file():
        index = faiss.read_index(str(cache))
        if index.nlist == plan.nlist and index.d == plan.dim and type(index) is type(_empty_index(plan)):
            return index
        log.warning("%s holds another index (%s, nlist %d, dim %d); training again", cache, type(index).__name__,
                    index.nlist, index.d)
    index = _empty_index(plan)
    index.cp.seed = seed
    sample = as_float32(xb[train_sample_rows(plan.rows, plan.train_rows, seed)], "training sample")
    log.info("index: training %s (nlist=%d%s) on %d of %d rows", plan.kind, plan.nlist,
             f", pq_m={plan.pq_m}" if plan.pq_m else "", len(sample), plan.rows)
    index.train(sample)
    if cache is not None:
        atomic_write_bytes(cache, faiss.serialize_index(index).tobytes())
    return index


class VectorIndex:
    """Rows `rows` of `xb` (default: all) indexed as `plan` says, on all visible GPUs (sharded) or on the CPU;
    `search` gives inner products and ids that are rows of `xb`. `trained`: IVF cells already trained (copied)."""

    whole_batches = False  # a search costs the same in any batch size: callers may search in chunks

    def __init__(self, xb: np.ndarray, plan: IndexPlan, use_gpu: bool | str = "auto", seed: int = 0,
                 rows: np.ndarray | None = None, cache: Path | None = None, trained: faiss.Index | None = None) -> None:
        import faiss
        self.plan = plan
        self.ntotal, self.dim = plan.rows, plan.dim
        self.on_gpu = resolve_use_gpu(use_gpu)
        self._xb = xb  # ivfpq re-ranks its candidates with the exact vectors
        rows = np.arange(plan.rows, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.size != plan.rows:
            raise ValueError(f"{rows.size} rows given to index, the index plan has {plan.rows}")
        if plan.kind == "flat":
            cpu_index = faiss.IndexFlatIP(self.dim)
        else:
            cpu_index = faiss.clone_index(trained) if trained is not None else train_ivf(xb, plan, seed, cache)
        self.index = to_all_gpus(cpu_index, shard=True) if self.on_gpu else cpu_index
        # rows added in chunks under their row numbers (a flat index numbers them itself: `_ids` maps back), so the
        # memory of one conversion to float32 is bounded by a chunk, not by the database
        self._ids = rows if plan.kind == "flat" else None
        for start in range(0, rows.size, ADD_CHUNK):
            part = rows[start:start + ADD_CHUNK]
            if plan.kind == "flat":
                self.index.add(as_float32(xb[part], "database embeddings"))
            else:
                self.index.add_with_ids(as_float32(xb[part], "database embeddings"), part)
        if plan.kind == "flat":
            return
        if self.on_gpu:
            faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", plan.nprobe)
        else:
            self.index.nprobe = plan.nprobe

    def search(self, xq: np.ndarray, k: int,
               cells: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities float32 [nq, k], ids int64 [nq, k]), best first; missing neighbours have id -1. `cells`:
        the queries' (similarities, ids) of their `nprobe` nearest IVF cells, already found (CPU only)."""
        if self.on_gpu and k > GPU_MAX_K:
            raise ValueError(f"k={k}: faiss GPU search supports k <= {GPU_MAX_K}")
        xq = as_float32(xq, "query embeddings")
        if self.plan.kind == "flat":
            sims, pos = self.index.search(xq, k)
            return sims, np.where(pos >= 0, self._ids[np.maximum(pos, 0)], -1)
        if self.plan.kind != "ivfpq":
            return self._ivf_search(xq, k, cells)
        # PQ similarities are approximations: re-rank a wider candidate list with the exact inner products, so a
        # threshold compares exact cosines and a near neighbour ranked low by its code can still make the top k.
        wide = min(self.ntotal, k * RERANK_FACTOR)
        _, ids = self._ivf_search(xq, wide, cells)
        sims = np.full(ids.shape, -np.inf, dtype=np.float32)
        for start in range(0, len(xq), RERANK_CHUNK):  # bounds the gathered [chunk, wide, dim] candidates
            part = ids[start:start + RERANK_CHUNK]
            cand = as_float32(self._xb[np.maximum(part, 0).ravel()]).reshape(*part.shape, self.dim)
            exact = np.einsum("qd,qkd->qk", xq[start:start + RERANK_CHUNK], cand)
            sims[start:start + RERANK_CHUNK] = np.where(part >= 0, exact, -np.inf)
        return best_of(sims, ids, k)

    def _ivf_search(self, xq: np.ndarray, k: int,
                    cells: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        if cells is None or self.on_gpu:
            return self.index.search(xq, k)
        return self.index.search_preassigned(xq, k, cells[1], cells[0])


def best_of(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` most similar of each row's candidates (sims, ids [nq, m]), best first; ties keep their order."""
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


class ShardedIndex:
    """`xb` as `plan` says, held one shard (row array, e.g. a partition's rows) at a time: a search indexes each shard
    in turn and keeps each query's best `k` over all of them, so the index's memory is one shard's, not the
    database's. The IVF cells are trained once, on a sample of the whole database, and shared: each shard's lists are
    those cells' lists restricted to the shard, so a query scans the same rows as in one index of every row and gets
    the same neighbours (ivfpq: each shard re-ranks its own candidates, so it sees at least as many as one index).
    Every search re-adds every row: search once with all the queries (`whole_batches`)."""

    whole_batches = True

    def __init__(self, xb: np.ndarray, plan: IndexPlan, use_gpu: bool | str, seed: int, shards: Sequence[np.ndarray],
                 cache: Path | None = None) -> None:
        self.plan, self.ntotal, self.dim = plan, plan.rows, plan.dim
        self.shards = [np.asarray(rows, dtype=np.int64) for rows in shards]
        held = sum(rows.size for rows in self.shards)
        if held != plan.rows:
            raise ValueError(f"the shards hold {held} rows, the index plan {plan.rows}")
        self._xb, self._use_gpu, self._seed = xb, use_gpu, seed
        self.on_gpu = resolve_use_gpu(use_gpu)
        self._trained = train_ivf(xb, plan, seed, cache) if plan.kind != "flat" else None

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities float32 [nq, k], ids int64 [nq, k]) over every shard, best first; missing: id -1."""
        xq = as_float32(xq, "query embeddings")
        sims = np.full((len(xq), k), -np.inf, dtype=np.float32)
        ids = np.full((len(xq), k), -1, dtype=np.int64)
        # each query's nearest cells, found once for every shard (they share the cells): [nq, nprobe] sims and ids
        # (a GPU index finds them itself)
        cells = self._trained.quantizer.search(xq, self.plan.nprobe) \
            if self._trained is not None and len(xq) and not self.on_gpu else None
        for rows in self.shards:
            if rows.size == 0 or len(xq) == 0:
                continue
            shard = VectorIndex(self._xb, dataclasses.replace(self.plan, rows=rows.size), self._use_gpu, self._seed,
                                rows, trained=self._trained)
            for start in range(0, len(xq), MERGE_CHUNK):  # the merge's [chunk, 2k] candidates, a chunk at a time
                at = slice(start, start + MERGE_CHUNK)
                found = shard.search(xq[at], min(k, rows.size), None if cells is None else (cells[0][at], cells[1][at]))
                sims[at], ids[at] = best_of(np.concatenate([sims[at], found[0]], axis=1),
                                            np.concatenate([ids[at], found[1]], axis=1), k)
        return sims, ids


def build_index(xb: np.ndarray, cfg: IndexConfig | None = None, use_gpu: bool | str = "auto",
                shards: Sequence[np.ndarray] | None = None, cache: Path | None = None,
                what: str = "index") -> VectorIndex | ShardedIndex:
    """Index `xb` ([n, d], L2-normalised; an array or an array-like read by rows, see above) as `cfg` says (None:
    flat, exact). `shards`: row arrays that partition the rows (e.g. one per manifest partition): the index holds one
    at a time (`ShardedIndex`); `cache`: where the trained IVF cells are kept for other tasks (see `train_ivf`)."""
    if not hasattr(xb, "shape"):
        xb = np.asarray(xb)
    if len(xb.shape) != 2:
        raise ValueError(f"database embeddings must be a 2-D array [n, dim], got shape {xb.shape}")
    plan = plan_index(cfg, xb.shape[0], xb.shape[1], what, fp16=np.dtype(xb.dtype) == np.float16)
    # said once per configured search; the exact searches of other steps (k-means assignment) stay quiet
    log.log(logging.INFO if cfg is not None else logging.DEBUG, "%s: %s index over %d x %d (%s)", what, plan.kind,
            plan.rows, plan.dim, plan.reason)
    seed = cfg.seed if cfg is not None else 0
    if shards is not None:
        return ShardedIndex(xb, plan, use_gpu, seed, shards, cache)
    return VectorIndex(xb, plan, use_gpu, seed, cache=cache)
