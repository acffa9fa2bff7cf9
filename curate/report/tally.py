"""What the curation report shows, gathered from the manifest one partition at a time.

Two passes over the partitions, each holding one partition's columns in memory. The first (`Tally`) counts: statuses,
rejection reasons with a first example, similarity histograms (fixed bins, summed), cluster sizes, and the size of
every duplicate group, contamination group and selection reason. From those counts `Tally.choose` decides what to
show (the largest groups, clusters drawn at random with the images drawn within them), and the second pass
(`Shown`) keeps the rows of exactly those images. Memory is one partition plus what is counted (per group, one
integer) and shown, whatever the manifest's size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.manifest import STATUSES

SIMILARITY_BINS = np.linspace(-0.2, 1.0, 61)
# manifest columns the report reads, when the manifest has them (the steps that write them may not have run)
COLUMNS = ("uid", "role", "source", "locator", "file", "member", "offset", "size", "status", "reject_reason",
           "duplicate_of", "duplicate_kind", "contaminated_by", "eval_similarity", "nn_similarity", "selected_by",
           "retrieval_score")
# which rows each kind of group gathers: (status, the column naming the group)
GROUPS = {"duplicates": ("duplicate", "duplicate_of"), "contamination": ("contaminated", "contaminated_by"),
          "retrieval": ("selected", "selected_by")}


def _mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def _rows(part: pa.Table, mask: np.ndarray) -> list[dict]:
    return part.filter(pa.array(mask)).to_pylist() if mask.any() else []


@dataclass
class Choice:
    """What the report shows: the largest groups of each kind, and the finest-level clusters drawn with, for each,
    the positions (in manifest order among the cluster's pool rows) of the images drawn in it."""

    groups: dict[str, list[tuple[str, int]]]  # kind -> [(group key, members)], largest first
    n_groups: dict[str, int]  # kind -> groups in the manifest
    clusters: dict[int, list[int]]  # cluster id -> sorted positions of the images shown
    cluster_sizes: np.ndarray  # pool rows per finest-level cluster
    n_clusters: int  # non-empty finest-level clusters


@dataclass
class Tally:
    """Counts over the whole manifest, added one partition at a time."""

    levels: list[str]  # cluster columns, finest first
    pool_status: Counter = field(default_factory=Counter)
    duplicate_kind: Counter = field(default_factory=Counter)
    references: dict[str, list[int]] = field(default_factory=lambda: {"seed": [0, 0], "eval": [0, 0]})  # rows, ok
    rejections: dict[str, list] = field(default_factory=dict)  # kind -> [count, first row]
    nn_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SIMILARITY_BINS) - 1, dtype=np.int64))
    eval_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SIMILARITY_BINS) - 1, dtype=np.int64))
    cluster_sizes: list[np.ndarray] = field(default_factory=list)
    group_sizes: dict[str, Counter] = field(default_factory=lambda: {kind: Counter() for kind in GROUPS})
    seeds: list[dict] = field(default_factory=list)  # the usable seed rows (retrieval groups show them)

    def __post_init__(self) -> None:
        self.cluster_sizes = [np.zeros(0, dtype=np.int64) for _ in self.levels]

    def add(self, part: pa.Table) -> None:
        """Count one partition's rows (the columns of `COLUMNS` and `levels` that the manifest has)."""
        role, status = part.column("role"), part.column("status")
        pool = _mask(pc.equal(role, "pool"))
        self.pool_status.update(pc.filter(status, pool).to_pylist())
        if "duplicate_kind" in part.column_names:
            dup = pool & _mask(pc.equal(status, "duplicate"))
            self.duplicate_kind.update(pc.filter(part.column("duplicate_kind"), dup).to_pylist())
        for name, counts in self.references.items():
            rows = _mask(pc.equal(role, name))
            counts[0] += int(rows.sum())
            counts[1] += int((rows & _mask(pc.equal(status, "ok"))).sum())
        for r in _rows(part.select(["source", "locator", "reject_reason"]), _mask(pc.equal(status, "rejected"))):
            entry = self.rejections.setdefault(r["reject_reason"].split(":")[0], [0, r])
            entry[0] += 1
        for column, hist in (("nn_similarity", self.nn_hist), ("eval_similarity", self.eval_hist)):
            if column in part.column_names:
                values = pc.filter(part.column(column), pool).drop_null().to_numpy()
                hist += np.histogram(np.clip(values.astype(np.float64), -0.2, 1.0), SIMILARITY_BINS)[0]
        for level, column in enumerate(self.levels):
            assign = pc.filter(part.column(column), pool).drop_null().to_numpy().astype(np.int64)
            sizes = np.bincount(assign, minlength=len(self.cluster_sizes[level]))
            sizes[: len(self.cluster_sizes[level])] += self.cluster_sizes[level]
            self.cluster_sizes[level] = sizes
        for kind, (group_status, column) in GROUPS.items():
            if column in part.column_names:
                keys = pc.filter(part.column(column), pool & _mask(pc.equal(status, group_status)))
                self.group_sizes[kind].update(k for k in keys.to_pylist() if k)
        self.seeds += _rows(part, _mask(pc.and_(pc.equal(role, "seed"), pc.equal(status, "ok"))))

    def statuses(self) -> dict[str, int]:
        return {s: self.pool_status.get(s, 0) for s in STATUSES}

    def choose(self, max_groups: int, images_per_group: int, seed: int) -> Choice:
        """The largest groups of each kind (ties: by key), and clusters and images drawn with `seed`."""
        groups = {kind: sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:max_groups]
                  for kind, sizes in self.group_sizes.items()}
        clusters: dict[int, list[int]] = {}
        ids: list[int] = []
        sizes = self.cluster_sizes[0] if self.levels else np.zeros(0, dtype=np.int64)
        if self.levels:
            ids = np.nonzero(sizes)[0].tolist()
            rng = np.random.default_rng(seed)
            shown = sorted(rng.choice(ids, size=min(max_groups, len(ids)), replace=False).tolist()) if ids else []
            for cid in shown:
                size = int(sizes[cid])
                clusters[cid] = sorted(rng.choice(size, size=min(images_per_group, size), replace=False).tolist())
        return Choice(groups, {kind: len(sizes) for kind, sizes in self.group_sizes.items()}, clusters, sizes,
                      len(ids))


@dataclass
class Shown:
    """The rows of the images a `Choice` shows, gathered one partition at a time."""

    choice: Choice
    levels: list[str]
    images_per_group: int
    members: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # kind -> group key -> rows
    cluster_rows: dict[int, list[dict]] = field(default_factory=dict)
    by_uid: dict[str, dict] = field(default_factory=dict)  # rows named by the groups: kept, eval and seed images
    _seen: dict[int, int] = field(default_factory=dict)  # cluster id -> its pool rows passed so far
    _order: int = 0  # rows of retrieval groups passed so far: ties in score keep manifest order

    def __post_init__(self) -> None:
        self.members = {kind: {key: [] for key, _ in groups} for kind, groups in self.choice.groups.items()}
        self.cluster_rows = {cid: [] for cid in self.choice.clusters}
        self._seen = dict.fromkeys(self.choice.clusters, 0)

    def named(self) -> set[str]:
        """uids the groups are named by: each duplicate group's kept image, each contamination's eval image, each
        seed that retrieved images."""
        keys = [k for kind in ("duplicates", "contamination") for k, _ in self.choice.groups[kind]]
        keys += [k.partition(":")[2] for k, _ in self.choice.groups["retrieval"] if k.startswith("seed:")]
        return set(keys)

    def add(self, part: pa.Table) -> None:
        status = part.column("status")
        pool = _mask(pc.equal(part.column("role"), "pool"))
        for r in _rows(part, _mask(pc.is_in(part.column("uid"), value_set=pa.array(sorted(self.named()),
                                                                                   pa.string())))):
            self.by_uid[r["uid"]] = r
        for kind, (group_status, column) in GROUPS.items():
            wanted = self.members[kind]
            if not wanted or column not in part.column_names:
                continue
            in_group = pool & _mask(pc.equal(status, group_status)) & _mask(
                pc.is_in(part.column(column), value_set=pa.array(list(wanted), pa.string())))
            for r in _rows(part, in_group):
                r["_order"], self._order = self._order, self._order + 1
                wanted[r[column]].append(r)
            for rows in wanted.values():  # a group shows its first images, or its best scores (retrieval)
                if kind == "retrieval":
                    rows.sort(key=lambda r: (-(r["retrieval_score"] or 0.0), r["_order"]))
                del rows[self.images_per_group:]
        if self.cluster_rows:
            finest = part.column(self.levels[0])
            for cid, positions in self.choice.clusters.items():
                rows = np.nonzero(pool & _mask(pc.equal(finest, cid)))[0]
                start = self._seen[cid]
                self._seen[cid] += len(rows)
                picked = [rows[p - start] for p in positions if start <= p < start + len(rows)]
                if picked:
                    self.cluster_rows[cid] += part.take(pa.array(picked, type=pa.int64())).to_pylist()


def read_columns(names: Sequence[str], levels: Sequence[str]) -> list[str]:
    """The columns the report reads from a manifest whose columns are `names`."""
    return [c for c in COLUMNS if c in names] + list(levels)
