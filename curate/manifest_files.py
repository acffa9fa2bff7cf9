"""The manifest on disk: a partitioned Parquet dataset, one file per partition, replaced whole and atomically.

Layout of a run's manifest (`manifest.parquet`, as `RunDir.manifest` names it):
    manifest.parquet -> manifest.versions/V      a symbolic link to the current version (relative, so a run folder
                                                 can be moved)
    manifest.versions/V/part-PPPPP.parquet       the rows of partition P (the `partition` column), in the order they
                                                 were written; part-00000 always exists, so an empty manifest has a
                                                 schema too

A writer fills a hidden folder (`.V.tmp`, skipped by every Parquet dataset reader), renames it to `V`, then replaces
the link in one rename: a reader sees the old version or the new one, never a mix, and a writer killed at any
point leaves the old version current. Version names are the writer's clock in nanoseconds and its process id, so
two writers never collide and names sort by age. Each write removes the versions older than the one it replaced
(the replaced one stays: a reader that resolved the link just before the swap can finish). Because the link names
a plain folder of Parquet files, `pyarrow.parquet.read_table("manifest.parquet")` reads the whole manifest too.

Readers resolve the link once and read through `pyarrow.dataset`: columns projected, partitions filtered (a
partition's rows are one file whose statistics say so, so other partitions' files are not read). A manifest written
as one plain Parquet file by an older version is read the same way and replaced by the layout above when next
written.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from curate.errors import CurateError

log = logging.getLogger(__name__)

ROW_GROUP_SIZE = 1 << 20


class ManifestError(CurateError, ValueError):
    """The manifest is missing, malformed, or breaks the accounting invariant."""


def versions_dir(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".parquet") + ".versions")


def part_name(partition: int) -> str:
    return f"part-{partition:05d}.parquet"


def open_dataset(path: str | Path, partitions: Sequence[int] | None = None) -> ds.Dataset:
    """The current version of the manifest at `path` as a pyarrow dataset (the link resolved once): the files of
    `partitions` only, when given (a single-file manifest of an older version: that file)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"no manifest at {path}: run `python -m curate ingest CONFIG` first")
    folder = path.resolve()
    try:
        if not folder.is_dir():
            return ds.dataset(folder, format="parquet")
        # the files listed in partition order, so every reader sees the rows in one order
        files = _part_files(folder) if partitions is None else \
            [folder / part_name(p) for p in sorted(set(partitions)) if (folder / part_name(p)).is_file()]
        return ds.dataset([str(f) for f in files], schema=pq.read_schema(folder / part_name(0)), format="parquet")
    except (pa.ArrowInvalid, OSError) as err:  # a foreign or damaged file: manifests are only ever replaced whole
        raise ManifestError(f"{path} is not a readable Parquet manifest ({err}): run `python -m curate ingest CONFIG "
                            "--force` to rebuild it") from None


def read_table(path: str | Path, columns: Sequence[str] | None = None, partitions: Sequence[int] | None = None,
               where: ds.Expression | None = None) -> pa.Table:
    """The manifest's rows (of `partitions` only, when given: only their files are read; those matching `where`, a
    pyarrow dataset filter, when given), with `columns` only (all when None)."""
    dataset = open_dataset(path, partitions)
    if columns is not None:
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise ManifestError(f"{path} has no columns {missing}: run the step that writes them first")
    if partitions is not None:
        in_partitions = ds.field("partition").isin([int(p) for p in partitions])
        where = in_partitions if where is None else in_partitions & where
    try:
        return dataset.to_table(columns=None if columns is None else list(columns), filter=where)
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"{path} is not a readable Parquet manifest ({err}): run `python -m curate ingest CONFIG "
                            "--force` to rebuild it") from None


def read_schema(path: str | Path) -> pa.Schema:
    """The manifest's columns and types, without reading its rows."""
    return open_dataset(path).schema


def partitions_of(path: str | Path) -> list[int]:
    """The partitions that hold rows: from the file names, or from the partition column of a single-file manifest."""
    folder = Path(path).resolve()
    if folder.is_dir():
        return [int(f.name[len("part-"):-len(".parquet")]) for f in _part_files(folder)]
    column = read_table(path, ["partition"]).column("partition")
    return sorted(int(p) for p in np.unique(column.to_numpy()))


def iter_partitions(path: str | Path, columns: Sequence[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
    """(partition, its rows) for every partition, in order (the order `read_table` reads them in): one partition in
    memory at a time."""
    for p in partitions_of(path):
        yield p, read_table(path, columns, [p])


def rewrite_partitions(path: str | Path, update: Callable[[pa.Table, slice], pa.Table]) -> Path:
    """Replace the manifest partition by partition: `update(rows, where)` gets one partition's rows and their place
    in the whole manifest's order (a slice of what `read_table` returns) and returns them changed."""
    with ManifestWriter(path) as writer:
        start = 0
        for _, part in iter_partitions(path):
            writer.write(update(part, slice(start, start + part.num_rows)))
            start += part.num_rows
    return Path(path)


def _part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


class ManifestWriter:
    """Writes a new version of the manifest at `path` partition by partition; `commit` makes it current.

    Every table written must have the same schema; rows of one partition may come in several tables (appended in
    order). A writer that is not committed (an exception, a kill) leaves the current version as it was.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.version = f"{time.time_ns():020d}-{os.getpid()}"
        self.staging = versions_dir(self.path) / f".{self.version}.tmp"
        self.staging.mkdir(parents=True, exist_ok=False)
        self._writers: dict[int, pq.ParquetWriter] = {}
        self._schema: pa.Schema | None = None

    def write(self, table: pa.Table) -> None:
        """Append `table`'s rows to the files of their partitions (rows keep their order within a partition)."""
        if self._schema is None:
            self._schema = table.schema
        elif not table.schema.equals(self._schema):
            raise ManifestError(f"manifest writer for {self.path}: a table with columns {table.schema.names} after "
                                f"one with {self._schema.names}; write every partition with the same columns")
        part = table.column("partition").to_numpy()
        for p in np.unique(part).tolist():
            rows = np.nonzero(part == p)[0]
            self._file(int(p)).write_table(table.take(pa.array(rows, type=pa.int64())), row_group_size=ROW_GROUP_SIZE)

    def _file(self, partition: int) -> pq.ParquetWriter:
        if partition not in self._writers:
            self._writers[partition] = pq.ParquetWriter(self.staging / part_name(partition), self._schema)
        return self._writers[partition]

    def commit(self) -> Path:
        """Close every file, make this version current in one rename of the link, remove older versions."""
        if self._schema is None:
            raise ManifestError(f"manifest writer for {self.path}: nothing written, so no schema to commit")
        self._file(0)  # the schema carrier, when partition 0 holds no rows
        for writer in self._writers.values():
            writer.close()
        for file in self.staging.iterdir():  # durable before the link points at them
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        final = versions_dir(self.path) / self.version
        os.rename(self.staging, final)
        previous = self.path.resolve().name if self.path.is_symlink() else None
        if self.path.is_dir() and not self.path.is_symlink():
            # a run folder copied without its links holds the version itself: keep it as the oldest version
            previous = f"{0:020d}-copied"
            os.rename(self.path, versions_dir(self.path) / previous)
        link = self.path.with_name(f".{self.path.name}.{self.version}.link")
        os.symlink(Path(final.parent.name) / final.name, link)
        os.replace(link, self.path)  # atomic: replaces the old link, or a single-file manifest of an older version
        self._remove_older_than(previous)
        return self.path

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def _remove_older_than(self, previous: str | None) -> None:
        """Versions (and staging folders of killed writers) older than the version this write replaced."""
        if previous is None:
            return
        for entry in versions_dir(self.path).iterdir():
            if entry.name.lstrip(".").removesuffix(".tmp") < previous:
                shutil.rmtree(entry, ignore_errors=True)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Replace the manifest at `path` by `table` (one file per partition, atomically)."""
    with ManifestWriter(path) as writer:
        writer.write(table)
    return Path(path)
