"""The curation report: `report/index.html` with counts per step, rejection reasons, histograms and image grids.

It reads only the run directory (manifest, markers, shard index) and the source images (for thumbnails), and
covers whichever steps have run, so it is useful after ingest alone as well as after a full run. The manifest is read
one partition at a time: counts and histograms are summed, the groups and clusters shown are chosen from those
counts, and only their rows are kept (`curate.report.tally`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.manifest import STATUSES, cluster_columns
from curate.manifest_files import iter_partitions, read_schema
from curate.report.html_blocks import Tile, counts_svg, grid, group, histogram_svg, page, section, table
from curate.report.tally import SIMILARITY_BINS, Shown, Tally, read_columns
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
    listed with their markers. The manifest is read twice, one partition at a time (`curate.report.tally`)."""
    schema = read_schema(run.manifest)
    levels = cluster_columns(schema.empty_table())
    columns = read_columns(schema.names, levels)
    tally = Tally(levels)
    for _, part in iter_partitions(run.manifest, columns):
        tally.add(part)
    shown = Shown(tally.choose(cfg.max_groups, cfg.images_per_group, cfg.seed), levels, cfg.images_per_group)
    for _, part in iter_partitions(run.manifest, columns):
        shown.add(part)
    rows = {r["uid"]: r for r in [*tally.seeds, *(r for rs in shown.cluster_rows.values() for r in rs),
                                  *(r for groups in shown.members.values() for rs in groups.values() for r in rs)]}
    by_uid = {**rows, **shown.by_uid}
    reader = SampleReader()
    thumbs = _Thumbs(reader, by_uid, cfg, limits)
    try:
        body = [
            _counts_section(run, tally, steps),
            _rejections_section(tally),
            _similarity_section(tally, dedup_threshold, eval_threshold),
            _cluster_hist_section(tally),
            _duplicates_section(shown, by_uid, thumbs, cfg),
            _contamination_section(shown, by_uid, thumbs, cfg),
            _clusters_section(shown, thumbs),
            _retrieval_section(tally, shown, by_uid, thumbs, cfg),
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


def _counts_section(run: RunDir, tally: Tally, steps: Sequence[str]) -> str:
    status = tally.statuses()
    lines = [("pool inputs", sum(status.values()))]
    indent = "\u00a0" * 4  # non-breaking: HTML collapses ordinary leading spaces
    lines += [(f"{indent}{s}", status[s]) for s in STATUSES if status[s] or s != "ok"]
    lines += [(f"{indent * 2}exact duplicates (same sha256)", tally.duplicate_kind.get("exact", 0)),
              (f"{indent * 2}near duplicates (kNN graph)", tally.duplicate_kind.get("near", 0))]
    for role, (n_rows, n_ok) in tally.references.items():
        if n_rows:
            lines.append((f"{role} inputs (ok / rejected)", f"{n_ok:,} / {n_rows - n_ok:,}"))
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


def _rejections_section(tally: Tally) -> str:
    if not tally.rejections:
        return section("Rejections", "<p>No input was rejected.</p>")
    lines = [(kind, n, f"{r['source']}:{r['locator']}", r["reject_reason"])
             for kind, (n, r) in sorted(tally.rejections.items(), key=lambda kv: -kv[1][0])]
    return section("Rejections", table(["reason", "inputs", "example", "full reason of the example"], lines))


def _similarity_section(tally: Tally, dedup_threshold: float | None, eval_threshold: float | None) -> str:
    n_nn = int(tally.nn_hist.sum())
    if n_nn == 0 and tally.eval_hist.sum() == 0:
        return ""
    parts = [counts_svg(tally.nn_hist, SIMILARITY_BINS, "Nearest-neighbour cosine similarity within the pool",
                        "cosine similarity", dedup_threshold, "dedup threshold", log_y=True)]
    if tally.eval_hist.sum():
        parts.append(counts_svg(tally.eval_hist, SIMILARITY_BINS, "Highest cosine similarity to an evaluation image",
                                "cosine similarity", eval_threshold, "decontamination threshold", log_y=True))
    return section("Similarity", "".join(parts), f"Nearest neighbours measured for {n_nn:,} sampled pool images. "
                   "Right of the dedup threshold, images are near-duplicates (one per group is kept); right of the "
                   "decontamination threshold, their whole group is removed.")


def _cluster_hist_section(tally: Tally) -> str:
    parts = []
    for col, sizes in zip(tally.levels, tally.cluster_sizes, strict=True):
        sizes = sizes[sizes > 0]
        if sizes.size:
            bins = np.unique(np.geomspace(1, sizes.max() + 1, 30).astype(int))
            parts.append(histogram_svg(sizes, bins, f"Cluster sizes, level {col[len('cluster_l'):]} "
                                       f"({sizes.size} non-empty clusters)", "images per cluster", log_y=True))
    return section("Cluster sizes", "".join(parts)) if parts else ""


def _duplicates_section(shown: Shown, by_uid: dict, thumbs: _Thumbs, cfg: ReportConfig) -> str:
    largest = shown.choice.groups["duplicates"]
    if not largest:
        return ""
    parts = []
    for keep, size in largest:
        tiles = [thumbs.tile(keep, f"kept {keep[:8]}", "key")]
        tiles += [thumbs.tile(m["uid"], f"{m['duplicate_kind']} {m['uid'][:8]}", "bad")
                  for m in shown.members["duplicates"][keep][: cfg.images_per_group - 1]]
        parts.append(group(f"{size + 1} images, kept {by_uid[keep]['source']}:{by_uid[keep]['locator']}",
                           thumbs.grid(tiles)))
    return section("Largest duplicate groups", "".join(parts),
                   f"{shown.choice.n_groups['duplicates']:,} groups; green: the image kept, red: removed copies.")


def _contamination_section(shown: Shown, by_uid: dict, thumbs: _Thumbs, cfg: ReportConfig) -> str:
    largest = shown.choice.groups["contamination"]
    if not largest:
        return ""
    parts = []
    for eval_uid, size in largest:
        tiles = [thumbs.tile(eval_uid, f"eval {eval_uid[:8]}", "key")]
        tiles += [thumbs.tile(m["uid"], f"{m['eval_similarity'] or 0:.2f} {m['uid'][:8]}", "bad")
                  for m in shown.members["contamination"][eval_uid][: cfg.images_per_group - 1]]
        parts.append(group(f"eval image {by_uid[eval_uid]['locator']}: {size} pool images removed",
                           thumbs.grid(tiles)))
    return section("Removed near-duplicates of evaluation images", "".join(parts))


def _clusters_section(shown: Shown, thumbs: _Thumbs) -> str:
    if not shown.levels:
        return ""
    parts = []
    for cid, rs in shown.cluster_rows.items():
        tiles = [thumbs.tile(r["uid"], f"{r['status']} {r['uid'][:8]}") for r in rs]
        parts.append(group(f"cluster {cid} ({shown.choice.cluster_sizes[cid]} images)", thumbs.grid(tiles)))
    return section(f"Sample clusters (finest level, {shown.levels[0]})", "".join(parts),
                   f"{len(shown.cluster_rows)} of {shown.choice.n_clusters} clusters drawn at random; images drawn "
                   "at random within each.")


def _retrieval_section(tally: Tally, shown: Shown, by_uid: dict, thumbs: _Thumbs, cfg: ReportConfig) -> str:
    largest = shown.choice.groups["retrieval"]
    if not largest:
        return ""
    seeds = tally.seeds
    parts = []
    for reason, size in largest:
        rs = shown.members["retrieval"][reason]  # the best scores first
        kind, _, ref = reason.partition(":")
        tiles = []
        if kind == "seed" and ref in by_uid:
            tiles.append(thumbs.tile(ref, f"seed {ref[:8]}", "key"))
            title = f"seed {by_uid[ref]['source']}:{by_uid[ref]['locator']}: {size} images retrieved"
        else:
            level, _, cid = ref.partition("/")
            col = f"cluster_l{level}"
            in_cluster = [s for s in seeds if cid.isdigit() and s.get(col) == int(cid)]
            tiles += [thumbs.tile(s["uid"], f"seed {s['uid'][:8]}", "key") for s in in_cluster[:2]]
            title = f"{reason}: {size} images selected, {len(in_cluster)} seed images in the cluster"
        tiles += [thumbs.tile(r["uid"], f"{r['retrieval_score'] or 0:.2f} {r['uid'][:8]}")
                  for r in rs[: cfg.images_per_group - len(tiles)]]
        parts.append(group(title, thumbs.grid(tiles)))
    return section("Retrievals", "".join(parts), f"{shown.choice.n_groups['retrieval']:,} selection reasons; green: "
                   "seed images, others by decreasing retrieval score.")
