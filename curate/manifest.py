"""The Parquet manifest: one row per input sample, forever, with its status and the reason for it.

Steps never edit `status` directly. Each step owns a few columns (dedup: `duplicate_of`, `contaminated_by`...;
retrieve: `selected`, `selected_by`...), overwrites them whole, and `derive_status` recomputes `status` and `reason`
from all columns. Re-running a step after a crash therefore lands on exactly the same manifest.

Roles: `pool` rows are the images being curated; `seed` and `eval` rows are the reference sets read by the same
readers (their status is only `ok` or `rejected`). The accounting invariant holds for pool rows:
inputs = selected + rejected + duplicate + contaminated + not_selected (+ ok while retrieval has not run).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import CurateError
from dinoforge.atomic import atomic_write

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


class ManifestError(CurateError, ValueError):
    """The manifest is missing, malformed, or breaks the accounting invariant."""


def read_manifest(path: str | Path) -> pa.Table:
    """Read a manifest written by `write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}: run `python -m curate ingest CONFIG` first")
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as err:  # a foreign or damaged file: manifests are only ever replaced whole
        raise ManifestError(f"{path} is not a readable Parquet manifest ({err}): run `python -m curate ingest CONFIG "
                            "--force` to rebuild it") from None
    missing = [n for n in INGEST_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ManifestError(f"{path} is not a curate manifest: missing columns {missing}")
    return table


def write_manifest(table: pa.Table, path: str | Path) -> Path:
    """Write `table` to `path` atomically (temporary file in the same folder, fsync, rename)."""
    return atomic_write(path, lambda fh: pq.write_table(table, fh, row_group_size=1 << 20))


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
    > ok. Applied lowest first, each rule overwriting the rows it matches.
    """
    n = table.num_rows

    def col(name: str) -> np.ndarray:
        values = table.column(name).to_pylist() if name in table.column_names else [None] * n
        out = np.empty(n, dtype=object)
        out[:] = values
        return out

    status = np.full(n, "ok", dtype=object)
    reason = np.full(n, None, dtype=object)
    selected, selected_by = col("selected"), col("selected_by")
    is_true = np.array([v is True for v in selected], dtype=bool)
    is_false = np.array([v is False for v in selected], dtype=bool)
    status[is_true], reason[is_true] = "selected", selected_by[is_true]
    status[is_false] = "not_selected"
    dup_of, dup_kind = col("duplicate_of"), col("duplicate_kind")
    dup = np.array([v is not None for v in dup_of], dtype=bool)
    status[dup] = "duplicate"
    reason[dup] = [f"{k or 'near'} duplicate of {u}" for u, k in zip(dup_of[dup], dup_kind[dup], strict=True)]
    contaminated, eval_sim = col("contaminated_by"), col("eval_similarity")
    cont = np.array([v is not None for v in contaminated], dtype=bool)
    status[cont] = "contaminated"
    reason[cont] = [f"near-duplicate group touches eval sample {u}" + (f" (cosine {s:.3f})" if s is not None else "")
                    for u, s in zip(contaminated[cont], eval_sim[cont], strict=True)]
    reference = col("role") != "pool"
    status[reference], reason[reference] = "ok", None
    rejected = col("reject_reason")
    rej = np.array([v is not None for v in rejected], dtype=bool)
    status[rej], reason[rej] = "rejected", rejected[rej]
    return set_columns(table, {"status": status.tolist(), "reason": reason.tolist()}, STATUS_SCHEMA)


def status_counts(table: pa.Table, role: str = "pool") -> dict[str, int]:
    """Rows per status among rows of `role`, every status listed (zeros included)."""
    mask = pc.equal(table.column("role"), role)
    counts = Counter(table.filter(mask).column("status").to_pylist())
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


def mask_of(table: pa.Table, role: str | None = None, statuses: Sequence[str] | None = None) -> np.ndarray:
    """Boolean row mask for a role and/or a set of statuses."""
    mask = np.ones(table.num_rows, dtype=bool)
    if role is not None:
        mask &= np.asarray(pc.equal(table.column("role"), role).to_numpy(zero_copy_only=False), dtype=bool)
    if statuses is not None:
        st = np.asarray(table.column("status").to_numpy(zero_copy_only=False), dtype=object)
        mask &= np.isin(st, list(statuses))
    return mask
