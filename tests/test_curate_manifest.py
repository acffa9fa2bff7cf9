"""Manifest: status derivation and its precedence, the accounting invariant, atomic writes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.manifest import (
    DEDUP_SCHEMA,
    INGEST_SCHEMA,
    RETRIEVE_SCHEMA,
    ManifestError,
    check_accounting,
    derive_status,
    new_manifest,
    read_manifest,
    set_columns,
    status_counts,
    write_manifest,
)


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


def test_uids_must_be_unique():
    with pytest.raises(ManifestError, match="uid a appears twice"):
        new_manifest([_row("a"), _row("a")])


def test_set_columns_checks_length():
    t = new_manifest([_row("a"), _row("b")])
    with pytest.raises(ManifestError, match="column 'selected': 1 values for 2 manifest rows"):
        set_columns(t, {"selected": [True]}, RETRIEVE_SCHEMA)


def test_write_is_atomic_and_roundtrips(tmp_path, monkeypatch):
    path = tmp_path / "manifest.parquet"
    t = _table()
    write_manifest(t, path)
    assert read_manifest(path).equals(t)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.parquet"]

    def dies_midway(table, where, **kw):
        where.write(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(t.slice(0, 2), path)
    assert read_manifest(path).equals(t)  # the old manifest is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.parquet"]  # and the partial file is gone


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="run `python -m curate ingest CONFIG` first"):
        read_manifest(tmp_path / "nope.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ManifestError, match="not a curate manifest"):
        read_manifest(tmp_path / "other.parquet")
    (tmp_path / "manifest.parquet").write_text("id,status\n1,ok\n")  # a foreign file where the manifest belongs
    with pytest.raises(ManifestError, match="is not a readable Parquet manifest .*ingest CONFIG --force"):
        read_manifest(tmp_path / "manifest.parquet")
