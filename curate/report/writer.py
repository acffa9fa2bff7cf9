"""The curation report: `report/index.html` with counts per step, rejection reasons, histograms and image grids.

It reads only the run directory (manifest, markers, shard index) and the source images (for thumbnails), and
covers whichever steps have run, so it is useful after ingest alone as well as after a full run.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.manifest import STATUSES, cluster_columns, read_manifest
from curate.report.html_blocks import Tile, grid, group, histogram_svg, page, section, table
from curate.rundir import THIS_CALL, RunDir
from curate.sources.decode import DecodeLimits
from curate.sources.sample_reader import SampleReader
from dinoforge.atomic import atomic_write_text
from dinoforge.data.shard_index import INDEX_NAME, read_index

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    """What the report shows."""

    thumb_size: int = 96  # pixels, longest side of each thumbnail
    max_groups: int = 12  # duplicate groups, contaminated groups, clusters and seeds shown
    images_per_group: int = 8
    seed: int = 0  # which clusters are sampled for display
    nn_sample: int = 20_000  # pool images whose nearest-neighbour similarity is measured for the histogram


def write_report(run: RunDir, cfg: ReportConfig, limits: DecodeLimits, dedup_threshold: float | None = None,
                 eval_threshold: float | None = None, steps: Sequence[str] = ()) -> Path:
    """Render report/index.html for the run at `run` and return its path; `steps` (the pipeline's, in order) are
    listed with their markers."""
    table_ = read_manifest(run.manifest)
    rows = table_.to_pylist()
    by_uid = {r["uid"]: r for r in rows}
    pool = [r for r in rows if r["role"] == "pool"]
    reader = SampleReader()
    thumbs = _Thumbs(reader, by_uid, cfg, limits)
    try:
        body = [
            _counts_section(run, rows, pool, steps),
            _rejections_section(rows),
            _similarity_section(pool, dedup_threshold, eval_threshold),
            _cluster_hist_section(table_),
            _duplicates_section(pool, by_uid, thumbs, cfg),
            _contamination_section(pool, by_uid, thumbs, cfg),
            _clusters_section(table_, pool, thumbs, cfg),
            _retrieval_section(rows, pool, by_uid, thumbs, cfg),
        ]
    finally:
        reader.close()
    html = page(f"Curation report: {run.root.name}", "".join(b for b in body if b), cfg.thumb_size)
    out = atomic_write_text(run.report / "index.html", html)
    log.info("report: %s (%.1f MiB)", out, len(html) / 2**20)
    return out


class _Thumbs:
    """Turns manifest rows into grid tiles, reading their bytes through the manifest's locations."""

    def __init__(self, reader: SampleReader, by_uid: dict, cfg: ReportConfig, limits: DecodeLimits) -> None:
        self.reader, self.by_uid, self.cfg, self.limits = reader, by_uid, cfg, limits

    def tile(self, uid: str, caption: str, style: str = "") -> Tile:
        r = self.by_uid[uid]
        data = None
        if r["reject_reason"] is None and r["size"] is not None:
            try:
                data = self.reader.read(r["file"], r["member"], r["offset"], r["size"])
            except OSError as err:
                log.warning("report: no thumbnail for %s: %s", uid, err)
        return Tile(data, caption, f"{r['source']}:{r['locator']} ({uid})", style)

    def grid(self, tiles: list[Tile]) -> str:
        return grid(tiles, self.cfg.thumb_size, self.limits)


def _counts_section(run: RunDir, rows: list[dict], pool: list[dict], steps: Sequence[str]) -> str:
    status = Counter(r["status"] for r in pool)
    dup_kind = Counter(r["duplicate_kind"] for r in pool if r["status"] == "duplicate")
    lines = [("pool inputs", len(pool))]
    indent = "\u00a0" * 4  # non-breaking: HTML collapses ordinary leading spaces
    lines += [(f"{indent}{s}", status.get(s, 0)) for s in STATUSES if status.get(s, 0) or s != "ok"]
    lines += [(f"{indent * 2}exact duplicates (same sha256)", dup_kind.get("exact", 0)),
              (f"{indent * 2}near duplicates (kNN graph)", dup_kind.get("near", 0))]
    for role in ("seed", "eval"):
        refs = [r for r in rows if r["role"] == role]
        if refs:
            n_ok = sum(r["status"] == "ok" for r in refs)
            lines.append((f"{role} inputs (ok / rejected)", f"{n_ok:,} / {len(refs) - n_ok:,}"))
    counts = table(["", "rows"], lines)
    step_rows = []
    for step in steps:
        marker = run.read_marker(step)
        if marker:
            facts = marker.get("summary", {})
            facts = {**facts, **facts.get(THIS_CALL, {})}  # how the last call ran (images/s...) is shown too
            summary = ", ".join(f"{k}={v}" for k, v in sorted(facts.items()) if not isinstance(v, dict | list))
            step_rows.append((step, marker.get("finished_at", ""), float(marker.get("elapsed_s", 0.0)), summary))
        else:
            step_rows.append((step, "not run", "", ""))
    shards_note = ""
    if (run.shards / INDEX_NAME).is_file():
        index = read_index(run.shards)
        total_bytes = sum(s.bytes for s in index.shards)
        shards_note = f"<p>{len(index.shards)} shards, {index.total_samples:,} samples, {total_bytes:,} bytes.</p>"
    steps_table = table(["step", "finished", "seconds", "summary"], step_rows)
    return section("Counts per step", counts + steps_table + shards_note,
                   "Every input is one manifest row: inputs = selected + rejected + duplicate + contaminated + "
                   "not_selected.")


def _rejections_section(rows: list[dict]) -> str:
    rejected = [r for r in rows if r["status"] == "rejected"]
    if not rejected:
        return section("Rejections", "<p>No input was rejected.</p>")
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in rejected:
        by_kind[r["reject_reason"].split(":")[0]].append(r)
    lines = [(kind, len(rs), f"{rs[0]['source']}:{rs[0]['locator']}", rs[0]["reject_reason"])
             for kind, rs in sorted(by_kind.items(), key=lambda kv: -len(kv[1]))]
    return section("Rejections", table(["reason", "inputs", "example", "full reason of the example"], lines))


def _similarity_section(pool: list[dict], dedup_threshold: float | None, eval_threshold: float | None) -> str:
    nn = np.array([r["nn_similarity"] for r in pool if r.get("nn_similarity") is not None], dtype=np.float64)
    ev = np.array([r["eval_similarity"] for r in pool if r.get("eval_similarity") is not None], dtype=np.float64)
    if nn.size == 0 and ev.size == 0:
        return ""
    bins = np.linspace(-0.2, 1.0, 61)
    parts = [histogram_svg(np.clip(nn, -0.2, 1.0), bins, "Nearest-neighbour cosine similarity within the pool",
                           "cosine similarity", dedup_threshold, "dedup threshold", log_y=True)]
    if ev.size:
        parts.append(histogram_svg(np.clip(ev, -0.2, 1.0), bins, "Highest cosine similarity to an evaluation image",
                                   "cosine similarity", eval_threshold, "decontamination threshold", log_y=True))
    return section("Similarity", "".join(parts), f"Nearest neighbours measured for {nn.size:,} sampled pool images. "
                   "Right of the dedup threshold, images are near-duplicates (one per group is kept); right of the "
                   "decontamination threshold, their whole group is removed.")


def _cluster_hist_section(t: pa.Table) -> str:
    cols = cluster_columns(t)
    if not cols:
        return ""
    pool = np.array(t.column("role").to_pylist()) == "pool"
    parts = []
    for col in cols:
        assign = np.array([-1 if v is None else v for v in t.column(col).to_pylist()])[pool]
        sizes = np.bincount(assign[assign >= 0]) if (assign >= 0).any() else np.zeros(0, dtype=np.int64)
        sizes = sizes[sizes > 0]
        if sizes.size:
            bins = np.unique(np.geomspace(1, sizes.max() + 1, 30).astype(int))
            parts.append(histogram_svg(sizes, bins, f"Cluster sizes, level {col[len('cluster_l'):]} "
                                       f"({sizes.size} non-empty clusters)", "images per cluster", log_y=True))
    return section("Cluster sizes", "".join(parts)) if parts else ""


def _groups(pool: list[dict], status: str, key: str) -> dict[str, list[dict]]:
    """Rows of `status` grouped by their (non-empty) `key` column: the image kept, the eval image, the selection."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in pool:
        if r["status"] == status and r[key]:
            groups[r[key]].append(r)
    return groups


def _largest(groups: dict[str, list[dict]], count: int) -> list[tuple[str, list[dict]]]:
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:count]


def _duplicates_section(pool: list[dict], by_uid: dict, thumbs: _Thumbs, cfg: ReportConfig) -> str:
    groups = _groups(pool, "duplicate", "duplicate_of")
    if not groups:
        return ""
    parts = []
    for keep, members in _largest(groups, cfg.max_groups):
        tiles = [thumbs.tile(keep, f"kept {keep[:8]}", "key")]
        tiles += [thumbs.tile(m["uid"], f"{m['duplicate_kind']} {m['uid'][:8]}", "bad")
                  for m in members[: cfg.images_per_group - 1]]
        parts.append(group(f"{len(members) + 1} images, kept {by_uid[keep]['source']}:{by_uid[keep]['locator']}",
                           thumbs.grid(tiles)))
    return section("Largest duplicate groups", "".join(parts),
                   f"{len(groups):,} groups; green: the image kept, red: removed copies.")


def _contamination_section(pool: list[dict], by_uid: dict, thumbs: _Thumbs, cfg: ReportConfig) -> str:
    groups = _groups(pool, "contaminated", "contaminated_by")
    if not groups:
        return ""
    parts = []
    for eval_uid, members in _largest(groups, cfg.max_groups):
        tiles = [thumbs.tile(eval_uid, f"eval {eval_uid[:8]}", "key")]
        tiles += [thumbs.tile(m["uid"], f"{m['eval_similarity'] or 0:.2f} {m['uid'][:8]}", "bad")
                  for m in members[: cfg.images_per_group - 1]]
        parts.append(group(f"eval image {by_uid[eval_uid]['locator']}: {len(members)} pool images removed",
                           thumbs.grid(tiles)))
    return section("Removed near-duplicates of evaluation images", "".join(parts))


def _clusters_section(t: pa.Table, pool: list[dict], thumbs: _Thumbs, cfg: ReportConfig) -> str:
    cols = cluster_columns(t)
    if not cols:
        return ""
    col = cols[0]
    members: dict[int, list[dict]] = defaultdict(list)
    for r in pool:
        if r.get(col) is not None:
            members[r[col]].append(r)
    ids = sorted(members)
    rng = np.random.default_rng(cfg.seed)
    shown = sorted(rng.choice(ids, size=min(cfg.max_groups, len(ids)), replace=False).tolist())
    parts = []
    for cid in shown:
        rs = members[cid]
        pick = rng.choice(len(rs), size=min(cfg.images_per_group, len(rs)), replace=False)
        tiles = [thumbs.tile(rs[i]["uid"], f"{rs[i]['status']} {rs[i]['uid'][:8]}") for i in sorted(pick)]
        parts.append(group(f"cluster {cid} ({len(rs)} images)", thumbs.grid(tiles)))
    return section(f"Sample clusters (finest level, {col})", "".join(parts),
                   f"{len(shown)} of {len(ids)} clusters drawn at random; images drawn at random within each.")


def _retrieval_section(rows: list[dict], pool: list[dict], by_uid: dict, thumbs: _Thumbs, cfg: ReportConfig) -> str:
    picked = _groups(pool, "selected", "selected_by")
    if not picked:
        return ""
    seeds = [r for r in rows if r["role"] == "seed" and r["status"] == "ok"]
    parts = []
    for reason, members in _largest(picked, cfg.max_groups):
        rs = sorted(members, key=lambda r: -(r["retrieval_score"] or 0.0))
        kind, _, ref = reason.partition(":")
        tiles = []
        if kind == "seed" and ref in by_uid:
            tiles.append(thumbs.tile(ref, f"seed {ref[:8]}", "key"))
            title = f"seed {by_uid[ref]['source']}:{by_uid[ref]['locator']}: {len(rs)} images retrieved"
        else:
            level, _, cid = ref.partition("/")
            col = f"cluster_l{level}"
            in_cluster = [s for s in seeds if cid.isdigit() and s.get(col) == int(cid)]
            tiles += [thumbs.tile(s["uid"], f"seed {s['uid'][:8]}", "key") for s in in_cluster[:2]]
            title = f"{reason}: {len(rs)} images selected, {len(in_cluster)} seed images in the cluster"
        tiles += [thumbs.tile(r["uid"], f"{r['retrieval_score'] or 0:.2f} {r['uid'][:8]}")
                  for r in rs[: cfg.images_per_group - len(tiles)]]
        parts.append(group(title, thumbs.grid(tiles)))
    return section("Retrievals", "".join(parts), f"{len(picked):,} selection reasons; green: seed images, others "
                   "by decreasing retrieval score.")
