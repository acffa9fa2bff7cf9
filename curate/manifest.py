"""The Parquet manifest: one row per input sample, forever, with its status and the reason for it.

Steps never edit `status` directly. Each step owns a few columns (dedup: `duplicate_of`, `contaminated_by`...;
retrieve: `selected`, `selected_by`...), overwrites them whole, and `derive_status` recomputes `status` and `reason`
from all columns. Re-running a step after a crash therefore lands on exactly the same manifest.

Roles: `pool` rows are the images being curated; `seed` and `eval` rows are the reference sets read by the same
readers (their status is only `ok` or `rejected`). The accounting invariant holds for pool rows:
inputs = selected + rejected + duplicate + contaminated + not_selected (+ ok while retrieval has not run).

On disk the manifest is one Parquet file per partition, replaced whole and atomically (`curate.manifest_files`);
steps read the columns and partitions they need, and rewrite it one partition at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from curate.manifest_files import ManifestError, iter_partitions, read_table, write_table

ROLES = ("pool", "seed", "eval")
STATUSES = ("ok", "rejected", "duplicate", "contaminated", "selected", "not_selected")
FINAL_POOL_STATUSES = ("selected", "rejected", "duplicate", "contaminated", "not_selected")

INGEST_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("role", pa.string()),
    ("source", pa.string()),
    ("locator", pa.string()),
    ("file", pa.string()),
    ("member", pa.string()),
    ("offset", pa.int64()),
    ("partition", pa.int32()),
    ("size", pa.int64()),
    ("sha256", pa.string()),
    ("format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("mode", pa.string()),
    ("reject_reason", pa.string()),
])
DEDUP_SCHEMA = pa.schema([
    ("duplicate_of", pa.string()),  # uid of the kept image of its exact or near-duplicate group
    ("duplicate_kind", pa.string()),  # "exact" (same sha256) or "near" (kNN-graph component)
    ("component", pa.int64()),  # near-duplicate component id (shared by all members)
    ("contaminated_by", pa.string()),  # uid of the evaluation image its component matched
    ("eval_similarity", pa.float32()),  # highest cosine similarity to any evaluation image
    ("nn_similarity", pa.float32()),  # cosine similarity to its nearest other pool image
])
RETRIEVE_SCHEMA = pa.schema([
    ("selected", pa.bool_()),
    ("selected_by", pa.string()),  # "seed:<uid>", "cluster:<level>/<id>", "balanced:<level>/<id>" or "all"
    ("retrieval_score", pa.float32()),
])
STATUS_SCHEMA = pa.schema([("status", pa.string()), ("reason", pa.string())])
CLUSTER_PREFIX = "cluster_l"  # one int32 column per hierarchy level: cluster_l1 (finest), cluster_l2, ...


def read_manifest(path: str | Path, columns: Sequence[str] | None = None, partitions: Sequence[int] | None = None,
                  where: ds.Expression | None = None) -> pa.Table:
    """Read a manifest written by `write_manifest`: `columns` only (all when None), rows of `partitions` only, rows
    matching `where` only (e.g. `pyarrow.dataset.field("status") == "selected"`)."""
    table = read_table(path, columns, partitions, where)
    missing = [n for n in INGEST_SCHEMA.names if n not in table.column_names]
    if columns is None and missing:
        raise ManifestError(f"{path} is not a curate manifest: missing columns {missing}")
    return table


def write_manifest(table: pa.Table, path: str | Path) -> Path:
    """Replace the manifest at `path` by `table`, atomically (`curate.manifest_files`: one file per partition)."""
    return write_table(table, path)


def new_manifest(rows: list[dict]) -> pa.Table:
    """A manifest table from ingest rows (dicts keyed by INGEST_SCHEMA names), with derived status columns."""
    table = pa.Table.from_pylist(rows, schema=INGEST_SCHEMA)
    uids = table.column("uid").to_pylist()
    if len(set(uids)) != len(uids):
        dup = next(u for u, c in Counter(uids).items() if c > 1)
        raise ManifestError(f"uid {dup} appears twice: two sources share a name and locator")
    return derive_status(table)


def set_columns(table: pa.Table, columns: dict[str, pa.Array | Sequence], schema: pa.Schema | None = None) -> pa.Table:
    """Replace (or append) whole columns; `schema` gives their types when values are plain Python sequences."""
    for name, values in columns.items():
        if not isinstance(values, pa.Array | pa.ChunkedArray):
            typ = schema.field(name).type if schema is not None and name in schema.names else None
            values = pa.array(values, type=typ)
        if len(values) != table.num_rows:
            raise ManifestError(f"column {name!r}: {len(values)} values for {table.num_rows} manifest rows")
        idx = table.column_names.index(name) if name in table.column_names else -1
        table = table.set_column(idx, name, values) if idx >= 0 else table.append_column(name, values)
    return table


def drop_columns(table: pa.Table, names: Sequence[str]) -> pa.Table:
    """`table` without the columns in `names` that it has."""
    return table.drop_columns([n for n in names if n in table.column_names])


def cluster_columns(table: pa.Table) -> list[str]:
    """The per-level cluster assignment columns, finest level first."""
    cols = [c for c in table.column_names if c.startswith(CLUSTER_PREFIX)]
    return sorted(cols, key=lambda c: int(c[len(CLUSTER_PREFIX):]))


def derive_status(table: pa.Table) -> pa.Table:
    """Recompute `status` and `reason` for every row from the step-owned columns.

    Precedence (highest first): rejected > (seed/eval rows: ok) > contaminated > duplicate > selected/not_selected
    > ok. Applied lowest first, each rule overwriting the rows it matches. Computed on Arrow columns: no Python object
    per row, so a partition of millions of rows costs a few bytes per row.
    """
    n = table.num_rows

    def col(name: str, typ: pa.DataType) -> pa.ChunkedArray | pa.Array:
        return table.column(name) if name in table.column_names else pa.nulls(n, typ)

    def where(mask: pa.Array) -> np.ndarray:
        return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)

    null = pa.scalar(None, pa.string())
    selected = col("selected", pa.bool_())
    is_true, is_false = where(pc.equal(selected, True)), where(pc.equal(selected, False))
    dup_of = col("duplicate_of", pa.string())
    dup = where(pc.is_valid(dup_of))
    contaminated = col("contaminated_by", pa.string())
    cont = where(pc.is_valid(contaminated))
    reference = where(pc.not_equal(table.column("role"), "pool"))
    rejected = table.column("reject_reason")
    rej = where(pc.is_valid(rejected))
    code = np.zeros(n, dtype=np.int32)  # index into STATUSES
    for mask, status in ((is_true, "selected"), (is_false, "not_selected"), (dup, "duplicate"),
                         (cont, "contaminated"), (reference, "ok"), (rej, "rejected")):
        code[mask] = STATUSES.index(status)
    reason = pc.if_else(is_true, col("selected_by", pa.string()), null)
    dup_reason = pc.binary_join_element_wise(pc.coalesce(col("duplicate_kind", pa.string()), "near"), dup_of,
                                             " duplicate of ")
    reason = pc.if_else(dup, dup_reason, reason)
    if cont.any():  # few rows: their reasons are formatted one by one
        sims = pc.filter(col("eval_similarity", pa.float32()), cont).to_pylist()
        texts = [f"near-duplicate group touches eval sample {u}" + (f" (cosine {s:.3f})" if s is not None else "")
                 for u, s in zip(pc.filter(contaminated, cont).to_pylist(), sims, strict=True)]
        reason = pc.replace_with_mask(reason, pa.array(cont), pa.array(texts, pa.string()))
    reason = pc.if_else(rej, rejected, pc.if_else(reference, null, reason))
    status = pc.take(pa.array(STATUSES, pa.string()), pa.array(code))
    return set_columns(table, {"status": status, "reason": reason}, STATUS_SCHEMA)


def status_counts(table: pa.Table, role: str = "pool") -> dict[str, int]:
    """Rows per status among rows of `role`, every status listed (zeros included)."""
    statuses = table.filter(pc.equal(table.column("role"), role)).column("status")
    counts = {c["values"].as_py(): c["counts"].as_py() for c in pc.value_counts(statuses)} if len(statuses) else {}
    return {s: counts.get(s, 0) for s in STATUSES}


def check_accounting(table: pa.Table, final: bool = False) -> dict[str, int]:
    """Assert the accounting invariant for pool rows and return the counts.

    Every pool input has exactly one status; with `final=True` (after retrieval) none is left at `ok`, so
    inputs = selected + rejected + duplicate + contaminated + not_selected.
    """
    uids = table.column("uid")
    if pc.count_distinct(uids).as_py() != table.num_rows:
        raise ManifestError("manifest uids are not unique")
    roles = set(table.column("role").to_pylist())
    if not roles <= set(ROLES):
        raise ManifestError(f"unknown roles in manifest: {sorted(roles - set(ROLES))}")
    counts = status_counts(table, "pool")
    n_pool = int(pc.sum(pc.equal(table.column("role"), "pool")).as_py() or 0)
    allowed = FINAL_POOL_STATUSES if final else STATUSES
    accounted = sum(counts[s] for s in allowed)
    if accounted != n_pool:
        raise ManifestError(f"accounting broken: {n_pool} pool inputs but {accounted} rows in statuses "
                            f"{allowed}: {counts}")
    return counts


def check_manifest_accounting(path: str | Path, final: bool = False) -> dict[str, int]:
    """`check_accounting` of the manifest at `path`, one partition's rows at a time, and the counts summed.

    A uid's partition is a function of the uid (`curate.partition`), so two rows with one uid share a partition:
    uids unique within every partition are unique in the manifest."""
    total: Counter[str] = Counter()
    for _, part in iter_partitions(path, ["uid", "role", "status"]):
        total.update(check_accounting(part, final))
    return {s: total[s] for s in STATUSES}


def mask_of(table: pa.Table, role: str | None = None, statuses: Sequence[str] | None = None) -> np.ndarray:
    """Boolean row mask for a role and/or a set of statuses."""
    mask = np.ones(table.num_rows, dtype=bool)
    if role is not None:
        mask &= np.asarray(pc.equal(table.column("role"), role).to_numpy(zero_copy_only=False), dtype=bool)
    if statuses is not None:
        chosen = pc.is_in(table.column("status"), value_set=pa.array(list(statuses), pa.string()))
        mask &= np.asarray(chosen.to_numpy(zero_copy_only=False), dtype=bool)
    return mask
