"""Embedding store: float16, L2-normalised vectors in one `.npy` per partition, aligned with the manifest by uid.

Layout of `embeddings/MODEL/`:
    part-PPPPP.uids.txt   uids of the partition's rows, one per line (row order of the .npy)
    part-PPPPP.npy        float16 [n, dim]; renamed into place last, so its presence marks the partition complete
    index.json            model, dim, partitions with file names and counts, written when every partition exists
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from curate.errors import CurateError
from dinoforge.atomic import atomic_write, atomic_write_json, atomic_write_text

INDEX_NAME = "index.json"
NORM_TOLERANCE = 2e-2  # float16 rounding of a unit vector moves its norm by ~1e-3; 2e-2 catches unnormalised output


class EmbeddingStoreError(CurateError, ValueError):
    """Embeddings missing, misaligned with the manifest, or not normalised."""


class EmbeddingStore:
    """The per-partition embedding files of one model under `root` (= run_dir/embeddings/MODEL)."""

    def __init__(self, root: str | Path, n_partitions: int) -> None:
        self.root = Path(root)
        self.n_partitions = n_partitions
        self._located: tuple[dict[str, tuple[int, int]], dict[int, np.ndarray]] | None = None

    def part_path(self, p: int) -> Path:
        return self.root / f"part-{p:05d}.npy"

    def uids_path(self, p: int) -> Path:
        return self.root / f"part-{p:05d}.uids.txt"

    def has_partition(self, p: int) -> bool:
        return self.part_path(p).is_file() and self.uids_path(p).is_file()

    def missing_partitions(self) -> list[int]:
        return [p for p in range(self.n_partitions) if not self.has_partition(p)]

    def write_partition(self, p: int, uids: Sequence[str], emb: np.ndarray) -> None:
        """Store partition `p` atomically: the uid list first, then the array whose rename completes it."""
        emb = np.asarray(emb)
        if emb.ndim != 2 or emb.shape[0] != len(uids):
            raise EmbeddingStoreError(f"partition {p}: {emb.shape} embeddings for {len(uids)} uids")
        _check_normalised(emb, f"partition {p} embeddings")
        self.root.mkdir(parents=True, exist_ok=True)
        self._located = None
        atomic_write_text(self.uids_path(p), "".join(f"{u}\n" for u in uids))
        atomic_write(self.part_path(p), lambda fh: np.save(fh, emb.astype(np.float16, copy=False)))

    def read_partition(self, p: int, mmap: bool = True) -> tuple[list[str], np.ndarray]:
        """(uids, float16 embeddings) of partition `p`."""
        if not self.has_partition(p):
            raise EmbeddingStoreError(f"partition {p} has no embeddings in {self.root}: run the embed step")
        uids = self.uids_path(p).read_text().split()
        emb = np.load(self.part_path(p), mmap_mode="r" if mmap else None)
        if emb.shape[0] != len(uids):
            raise EmbeddingStoreError(f"{self.part_path(p)}: {emb.shape[0]} rows but {len(uids)} uids; delete both "
                                      "files and rerun the embed step")
        return uids, emb

    def write_index(self, model: str, dim: int) -> Path:
        """index.json for the complete store (raises when a partition is missing)."""
        missing = self.missing_partitions()
        if missing:
            raise EmbeddingStoreError(f"cannot index {self.root}: partitions {missing[:10]} are not embedded yet")
        _, arrays = self.locate()
        parts = [{"partition": p, "file": self.part_path(p).name, "uids_file": self.uids_path(p).name,
                  "count": len(arrays[p])} for p in range(self.n_partitions)]
        doc = {"model": model, "dim": dim, "dtype": "float16", "normalised": "l2", "n_partitions": self.n_partitions,
               "total": sum(x["count"] for x in parts), "partitions": parts}
        return atomic_write_json(self.root / INDEX_NAME, doc)

    def gather(self, uids: Sequence[str]) -> np.ndarray:
        """float16 embeddings of `uids`, in that order (every uid must be stored)."""
        position, arrays = self.locate()
        if not uids:
            return np.zeros((0, arrays[0].shape[1]), dtype=np.float16)
        missing = [u for u in uids if u not in position]
        if missing:
            raise EmbeddingStoreError(f"{len(missing)} manifest rows have no embedding in {self.root} (e.g. uid "
                                      f"{missing[0]}); the embeddings are stale: delete the folder and rerun embed")
        out = np.empty((len(uids), arrays[0].shape[1]), dtype=np.float16)
        parts = np.fromiter((position[u][0] for u in uids), dtype=np.int64, count=len(uids))
        rows = np.fromiter((position[u][1] for u in uids), dtype=np.int64, count=len(uids))
        for p, emb in arrays.items():
            sel = np.nonzero(parts == p)[0]
            if sel.size:
                order = np.argsort(rows[sel], kind="stable")  # ascending file offsets: sequential reads of the memmap
                out[sel[order]] = emb[rows[sel][order]]
        return out

    def locate(self) -> tuple[dict[str, tuple[int, int]], dict[int, np.ndarray]]:
        """(uid -> (partition, row), memory-mapped array per partition), read once per store (steps gather several
        times: pool, seeds and evals)."""
        if self._located is None:
            position: dict[str, tuple[int, int]] = {}
            arrays: dict[int, np.ndarray] = {}
            for p in range(self.n_partitions):
                part_uids, arrays[p] = self.read_partition(p)
                position.update((u, (p, i)) for i, u in enumerate(part_uids))
            self._located = position, arrays
        return self._located


def _check_normalised(emb: np.ndarray, what: str) -> None:
    if emb.size == 0:
        return
    norms = np.linalg.norm(emb.astype(np.float32), axis=1)
    bad = np.nonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)[0]
    if bad.size:
        raise EmbeddingStoreError(f"{what}: {bad.size} rows are not L2-normalised (row {bad[0]} has norm "
                                  f"{norms[bad[0]]:.4f}); the embedder must return unit vectors")
    if not np.isfinite(emb).all():
        raise EmbeddingStoreError(f"{what}: contains NaN or inf")
