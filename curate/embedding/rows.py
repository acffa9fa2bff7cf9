"""The embeddings of chosen manifest rows, read from the store's memory maps only when indexed.

A step that clusters or searches the pool used to gather every pool embedding into one array (and to map every uid
of the run to its file position in a dict): memory grew with the pool beyond the store's own files. `EmbeddingRows`
holds two integers per row instead (partition, row in its file), found partition by partition, and indexing it
(`rows[a:b]`, `rows[indices]`) copies only the rows asked for, so k-means can train on a sample and assign the rest in
chunks.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.embedding.store import EmbeddingStore, EmbeddingStoreError

CHUNK_ROWS = 1 << 16  # rows converted to float32 at a time by the chunked passes (16 MB at dim 64)


class EmbeddingRows:
    """float16 embeddings of rows (partition `parts[i]`, row `rows[i]` of its file) of `store`, in that order."""

    def __init__(self, store: EmbeddingStore, parts: np.ndarray, rows: np.ndarray) -> None:
        self.store = store
        self.parts, self.rows = np.asarray(parts, dtype=np.int32), np.asarray(rows, dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}
        dim = self._map(int(self.parts[0])).shape[1] if len(self.parts) else 0
        self.shape = (len(self.rows), dim)
        self.dtype = np.dtype(np.float16)
        self.ndim = 2

    def _map(self, p: int) -> np.ndarray:
        if p not in self._maps:
            self._maps[p] = np.load(self.store.part_path(p), mmap_mode="r")
        return self._maps[p]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        """The rows at `index` (a slice or integer positions) as a float16 array."""
        parts, rows = self.parts[index], self.rows[index]
        out = np.empty((len(rows), self.shape[1]), dtype=np.float16)
        for p in np.unique(parts).tolist():
            sel = np.nonzero(parts == p)[0]
            order = np.argsort(rows[sel], kind="stable")  # ascending file offsets: sequential reads of the map
            out[sel[order]] = self._map(p)[rows[sel][order]]
        return out


def manifest_rows(store: EmbeddingStore, table: pa.Table, rows: np.ndarray | None = None) -> EmbeddingRows:
    """The embeddings of `table`'s rows (it needs the `uid` and `partition` columns), in its row order; of the rows
    at positions `rows` only (a boolean mask or integer positions), when given. Only the two columns are copied."""
    table = table.select(["uid", "partition"])
    if rows is not None:
        rows = np.asarray(rows)
        table = table.filter(pa.array(rows)) if rows.dtype == bool else table.take(pa.array(rows, type=pa.int64()))
    part = np.asarray(table.column("partition").to_numpy(), dtype=np.int32)
    rows = np.empty(len(part), dtype=np.int64)
    for p in np.unique(part).tolist():
        sel = np.nonzero(part == p)[0]
        uids = pc.take(table.column("uid"), pa.array(sel, type=pa.int64()))
        rows[sel] = positions(store, p, uids)
    return EmbeddingRows(store, part, rows)


def positions(store: EmbeddingStore, p: int, uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The row of each of `uids` in partition `p`'s file (a hash table of that partition only)."""
    stored, _ = store.read_partition(p)
    found = pc.index_in(uids, value_set=pa.array(stored, pa.string()))
    if found.null_count:
        missing = pc.filter(uids, pc.is_null(found))[0].as_py()
        raise EmbeddingStoreError(f"{found.null_count} manifest rows of partition {p} have no embedding in "
                                  f"{store.root} (e.g. uid {missing}); the embeddings are stale: delete the folder "
                                  "and rerun embed")
    return np.asarray(found.to_numpy(), dtype=np.int64)
