"""Manifest: status derivation and its precedence, the accounting invariant, the partitioned dataset on disk and
its atomic writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate.manifest import (
    DEDUP_SCHEMA,
    INGEST_SCHEMA,
    RETRIEVE_SCHEMA,
    ManifestError,
    check_accounting,
    check_manifest_accounting,
    derive_status,
    new_manifest,
    read_manifest,
    set_columns,
    status_counts,
    write_manifest,
)
from curate.manifest_files import ManifestWriter, iter_partitions, rewrite_partitions


def _row(uid: str, role: str = "pool", reject: str | None = None) -> dict:
    row = {name: None for name in INGEST_SCHEMA.names}
    row.update(uid=uid, role=role, source="s", locator=f"{uid}.jpg", file=f"/x/{uid}.jpg", partition=0, size=10,
               reject_reason=reject)
    return row


def _table() -> pa.Table:
    rows = [_row("a"), _row("b", reject="empty file (0 bytes)"), _row("c"), _row("d"), _row("e"), _row("f"),
            _row("s1", role="seed"), _row("e1", role="eval"), _row("e2", role="eval", reject="not an image: x")]
    table = new_manifest(rows)
    # a: selected; c: exact duplicate of a; d: near duplicate of a but also contaminated (contamination wins);
    # e: not selected; f: selected through its cluster; b stays 'rejected' whatever later columns hold.
    table = set_columns(table, {
        "duplicate_of": [None, None, "a", "a", None, None, None, None, None],
        "duplicate_kind": [None, None, "exact", "near", None, None, None, None, None],
        "component": [0, 7, 0, 0, 1, 2, None, None, None],
        "contaminated_by": [None, None, None, "e1", None, None, None, None, None],
        "eval_similarity": [0.1, None, 0.1, 0.5, 0.2, 0.3, None, None, None],
        "nn_similarity": [None] * 9,
    }, DEDUP_SCHEMA)
    table = set_columns(table, {
        "selected": [True, None, False, False, False, True, None, None, None],
        "selected_by": ["seed:s1", None, None, None, None, "cluster:1/4", None, None, None],
        "retrieval_score": [0.9, None, None, None, None, 0.4, None, None, None],
    }, RETRIEVE_SCHEMA)
    return derive_status(table)


def test_status_precedence_and_reasons():
    t = _table()
    got = dict(zip(t.column("uid").to_pylist(), zip(t.column("status").to_pylist(), t.column("reason").to_pylist(),
                                                    strict=True), strict=True))
    assert got["a"] == ("selected", "seed:s1")
    assert got["b"] == ("rejected", "empty file (0 bytes)")
    assert got["c"] == ("duplicate", "exact duplicate of a")
    assert got["d"][0] == "contaminated" and "e1" in got["d"][1] and "0.500" in got["d"][1]
    assert got["e"] == ("not_selected", None)
    assert got["f"] == ("selected", "cluster:1/4")
    assert got["s1"] == ("ok", None) and got["e1"] == ("ok", None)
    assert got["e2"] == ("rejected", "not an image: x")


def test_accounting_invariant_counts_every_pool_input():
    t = _table()
    counts = check_accounting(t, final=True)
    assert counts == {"ok": 0, "rejected": 1, "duplicate": 1, "contaminated": 1, "selected": 2, "not_selected": 1}
    assert status_counts(t, "eval") == {"ok": 1, "rejected": 1, "duplicate": 0, "contaminated": 0, "selected": 0,
                                        "not_selected": 0}


def test_accounting_final_refuses_undecided_rows():
    t = new_manifest([_row("a"), _row("b")])
    assert check_accounting(t, final=False)["ok"] == 2
    with pytest.raises(ManifestError, match="accounting broken: 2 pool inputs but 0 rows"):
        check_accounting(t, final=True)


def test_accounting_of_a_manifest_on_disk_goes_partition_by_partition(tmp_path):
    t = _table()
    t = t.set_column(t.schema.get_field_index("partition"), "partition",
                     pa.array([i % 3 for i in range(t.num_rows)], pa.int32()))
    write_manifest(t, tmp_path / "manifest.parquet")
    assert check_manifest_accounting(tmp_path / "manifest.parquet", final=True) == check_accounting(t, final=True)
    undecided = new_manifest([{**_row("a"), "partition": 0}, {**_row("b"), "partition": 1}])
    write_manifest(undecided, tmp_path / "undecided.parquet")
    assert check_manifest_accounting(tmp_path / "undecided.parquet")["ok"] == 2
    with pytest.raises(ManifestError, match="accounting broken"):
        check_manifest_accounting(tmp_path / "undecided.parquet", final=True)
    twice = pa.concat_tables([new_manifest([_row("a")])] * 2)  # one uid twice, so in one partition
    write_manifest(twice, tmp_path / "twice.parquet")
    with pytest.raises(ManifestError, match="not unique"):
        check_manifest_accounting(tmp_path / "twice.parquet")


def test_uids_must_be_unique():
    with pytest.raises(ManifestError, match="uid a appears twice"):
        new_manifest([_row("a"), _row("a")])


def test_set_columns_checks_length():
    t = new_manifest([_row("a"), _row("b")])
    with pytest.raises(ManifestError, match="column 'selected': 1 values for 2 manifest rows"):
        set_columns(t, {"selected": [True]}, RETRIEVE_SCHEMA)


def _partitioned(n_partitions: int = 3) -> pa.Table:
    """_table() with its rows spread over partitions, interleaved."""
    t = _table()
    return set_columns(t, {"partition": pa.array([i % n_partitions for i in range(t.num_rows)], pa.int32())})


def _in_partition_order(t: pa.Table) -> pa.Table:
    """`t`'s rows grouped by partition, keeping their order within each: the order a manifest is read back in."""
    order = sorted(range(t.num_rows), key=lambda i: t.column("partition")[i].as_py())
    return t.take(pa.array(order, type=pa.int64()))


def test_manifest_is_one_file_per_partition_and_roundtrips(tmp_path):
    path = tmp_path / "manifest.parquet"
    t = _partitioned()
    write_manifest(t, path)
    assert sorted(p.name for p in path.iterdir()) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert read_manifest(path).equals(_in_partition_order(t))
    assert pq.read_table(path).equals(_in_partition_order(t))  # a plain Parquet reader reads the folder whole


def test_reader_reads_one_partition_and_projects_columns(tmp_path):
    path = tmp_path / "manifest.parquet"
    t = _partitioned()
    write_manifest(t, path)
    (path / "part-00002.parquet").write_bytes(b"PAR1 damaged")  # never opened by a reader of partition 1
    got = read_manifest(path, columns=["uid", "status"], partitions=[1])
    assert got.equals(t.filter(pc.equal(t.column("partition"), 1)).select(["uid", "status"]))
    assert read_manifest(path, partitions=[1, 5]).num_rows == got.num_rows  # a partition without rows: none
    with pytest.raises(ManifestError, match="not a readable Parquet manifest"):
        read_manifest(path)
    with pytest.raises(ManifestError, match=r"no columns \['cluster_l1'\]: run the step that writes them"):
        read_manifest(path, columns=["uid", "cluster_l1"], partitions=[0])


def test_partitions_are_iterated_one_at_a_time(tmp_path):
    path = tmp_path / "manifest.parquet"
    t = _partitioned()
    write_manifest(t, path)
    parts = list(iter_partitions(path, ["uid", "partition"]))
    assert [p for p, _ in parts] == [0, 1, 2]
    assert all(set(part.column("partition").to_pylist()) == {p} for p, part in parts)
    assert sum(part.num_rows for _, part in parts) == t.num_rows


def test_rewrite_partitions_gives_each_partition_its_place_in_the_whole(tmp_path):
    path = tmp_path / "manifest.parquet"
    t = _partitioned()
    write_manifest(t, path)
    whole = read_manifest(path)
    rank = pa.array(range(whole.num_rows), pa.int64())
    rewrite_partitions(path, lambda part, where: set_columns(part, {"component": rank[where]}))
    got = read_manifest(path)
    assert got.column("component").to_pylist() == list(range(t.num_rows))
    assert got.drop_columns(["component"]).equals(whole.drop_columns(["component"]))


def test_write_is_atomic_and_keeps_one_older_version(tmp_path, monkeypatch):
    path = tmp_path / "manifest.parquet"
    t = _partitioned()
    for _ in range(3):
        write_manifest(t, path)
    assert read_manifest(path).equals(_in_partition_order(t))
    versions = tmp_path / "manifest.versions"
    assert len(list(versions.iterdir())) == 2  # the current one and the one it replaced (a reader may be on it)
    assert path.is_symlink() and not Path(os.readlink(path)).is_absolute()  # the run folder can move

    def dies_midway(self, table, *args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pq.ParquetWriter, "write_table", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(t.slice(0, 2), path)
    assert read_manifest(path).equals(_in_partition_order(t))  # the old manifest is untouched
    assert len(list(versions.iterdir())) == 2  # and the partial version is gone


def test_a_single_file_manifest_is_read_and_replaced_by_the_dataset(tmp_path):
    path = tmp_path / "manifest.parquet"
    t = _partitioned()
    pq.write_table(t, path)  # the layout before one file per partition
    assert read_manifest(path).equals(t)
    write_manifest(read_manifest(path), path)
    assert path.is_symlink() and read_manifest(path).equals(_in_partition_order(t))


def test_a_manifest_copied_without_its_link_is_replaced_by_the_next_write(tmp_path):
    t = _partitioned()
    write_manifest(t, tmp_path / "a" / "manifest.parquet")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copies the current version's folder in place of the link
    path = tmp_path / "b" / "manifest.parquet"
    assert path.is_dir() and not path.is_symlink() and read_manifest(path).equals(_in_partition_order(t))
    write_manifest(t.slice(0, 4), path)
    assert path.is_symlink() and read_manifest(path).equals(_in_partition_order(t.slice(0, 4)))


def test_writer_refuses_tables_with_other_columns(tmp_path):
    t = _partitioned()
    writer = ManifestWriter(tmp_path / "manifest.parquet")
    writer.write(t)
    with pytest.raises(ManifestError, match="write every partition with the same columns"):
        writer.write(t.drop_columns(["reason"]))
    writer.abort()
    assert not (tmp_path / "manifest.parquet").exists()
    assert list((tmp_path / "manifest.versions").iterdir()) == []


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="run `python -m curate ingest CONFIG` first"):
        read_manifest(tmp_path / "nope.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ManifestError, match="not a curate manifest"):
        read_manifest(tmp_path / "other.parquet")
    (tmp_path / "manifest.parquet").write_text("id,status\n1,ok\n")  # a foreign file where the manifest belongs
    with pytest.raises(ManifestError, match="is not a readable Parquet manifest .*ingest CONFIG --force"):
        read_manifest(tmp_path / "manifest.parquet")
