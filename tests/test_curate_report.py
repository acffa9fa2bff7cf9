"""Report: a self-contained HTML page with counts, rejection reasons, histograms and thumbnail grids."""

from __future__ import annotations

import base64
import io
import re
import shutil
import time
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from curate_photos import photo_paths
from PIL import Image

from curate.manifest import DEDUP_SCHEMA, RETRIEVE_SCHEMA, derive_status, set_columns, write_manifest
from curate.report.html_blocks import histogram_svg
from curate.report.tally import COLUMNS, Shown, Tally
from curate.report.writer import ReportConfig, write_report
from curate.rundir import RunDir
from curate.sources.decode import DecodeLimits
from curate.sources.ingest import IngestConfig, SourceConfig, ingest_sources

EVIL = "<b onclick='steal()'>x&amp;.jpg"


class _Collect(HTMLParser):
    """Tags and attributes of a page; fails on unbalanced structural tags."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.links: list[str] = []
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        for key in ("href", "src"):
            if key in attrs:
                self.links.append(attrs[key])
        if tag in ("section", "table", "figure", "svg", "div"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("section", "table", "figure", "svg", "div"):
            assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture()
def finished_run(tmp_path):
    """A run directory as a full run leaves it, with hand-set dedup/cluster/retrieval columns on real photos."""
    pool = tmp_path / "pool"
    pool.mkdir()
    photos = photo_paths("imagenette", per_class=2)[:16]
    for i, p in enumerate(photos):
        shutil.copy(p, pool / f"img{i:02d}.jpg")
    shutil.copy(photos[0], pool / EVIL)  # an exact copy with a hostile name
    (pool / "zero.jpg").write_bytes(b"")
    (pool / "text.jpg").write_text("hello")
    evals = tmp_path / "evals"
    evals.mkdir()
    shutil.copy(photos[3], evals / "e.jpg")
    table = ingest_sources([("pool", SourceConfig(str(pool))), ("eval", SourceConfig(str(evals)))], IngestConfig(), 2)
    loc = table.column("locator").to_pylist()
    uid = dict(zip(loc, table.column("uid").to_pylist(), strict=True))
    n = table.num_rows
    col = {k: [None] * n for k in DEDUP_SCHEMA.names + RETRIEVE_SCHEMA.names}
    cluster = [None] * n
    for i, name in enumerate(loc):
        if name.startswith("img") or name == EVIL:
            k = int(name[3:5]) if name.startswith("img") else 0
            col["nn_similarity"][i] = 0.3 + 0.04 * k
            col["eval_similarity"][i] = 0.1 + 0.02 * k
            col["component"][i] = k
            cluster[i] = k % 3
            col["selected"][i] = k % 2 == 0
            col["selected_by"][i] = f"cluster:1/{k % 3}" if k % 2 == 0 else None
            col["retrieval_score"][i] = 0.5 if k % 2 == 0 else None
    i_evil, i_dup, i_cont = loc.index(EVIL), loc.index("img05.jpg"), loc.index("img03.jpg")
    col["duplicate_of"][i_evil], col["duplicate_kind"][i_evil] = uid["img00.jpg"], "exact"
    col["duplicate_of"][i_dup], col["duplicate_kind"][i_dup] = uid["img00.jpg"], "near"
    col["contaminated_by"][i_cont], col["eval_similarity"][i_cont] = uid["e.jpg"], 0.97
    table = set_columns(table, {k: col[k] for k in DEDUP_SCHEMA.names}, DEDUP_SCHEMA)
    table = set_columns(table, {k: col[k] for k in RETRIEVE_SCHEMA.names}, RETRIEVE_SCHEMA)
    table = derive_status(set_columns(table, {"cluster_l1": pa.array(cluster, pa.int32())}))
    run = RunDir(tmp_path / "run")
    write_manifest(table, run.manifest)
    for step in ("ingest", "embed", "dedup"):
        run.write_marker(step, "f" * 16, {"note": step}, time.time())
    return run, table


def _parse(path) -> _Collect:
    page = _Collect()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == []
    return page


def test_report_is_self_contained_with_thumbnails(finished_run):
    run, table = finished_run
    out = write_report(run, ReportConfig(thumb_size=64), DecodeLimits(), 0.6, 0.45)
    assert out == run.report / "index.html"
    page = _parse(out)
    assert page.imgs, "no thumbnails"
    assert all(link.startswith("data:image/jpeg;base64,") for link in page.links), "external reference in report"
    thumb = Image.open(io.BytesIO(base64.b64decode(page.imgs[0]["src"].split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) == 64
    html = out.read_text()
    assert "<b onclick" not in html and "&lt;b onclick=&#x27;steal()&#x27;&gt;x&amp;amp;.jpg" in html  # escaped
    for title in ("Counts per step", "Rejections", "Similarity", "Cluster sizes", "Largest duplicate groups",
                  "Removed near-duplicates of evaluation images", "Sample clusters", "Retrievals"):
        assert f"<h2>{title}" in html, title
    assert html.count("<svg") == 3  # nn similarity, eval similarity, cluster sizes


def test_report_counts_match_manifest(finished_run):
    run, table = finished_run
    out = write_report(run, ReportConfig(), DecodeLimits(), 0.6, 0.45)
    text = " ".join(_parse(out).text)
    status = table.column("status").to_pylist()
    pool_rows = sum(r == "pool" for r in table.column("role").to_pylist())
    assert re.search(rf"pool inputs\s+{pool_rows}\b", text)
    for s in ("rejected", "duplicate", "contaminated", "selected", "not_selected"):
        assert re.search(rf"\u00a0{s}\s+{status.count(s)}\b", text), s
    assert re.search(r"empty file \(0 bytes\)\s+1\s+pool:zero\.jpg", text)
    assert re.search(r"not an image\s+1\s+pool:text\.jpg", text)
    assert "2 images, kept pool:img00.jpg" not in text and "3 images, kept pool:img00.jpg" in text


def test_report_after_ingest_only(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for p in photo_paths("imagewoof", per_class=1)[:3]:
        shutil.copy(p, pool / p.name)
    run = RunDir(tmp_path / "run")
    write_manifest(ingest_sources([("pool", SourceConfig(str(pool)))], IngestConfig(), 1), run.manifest)
    html = write_report(run, ReportConfig(), DecodeLimits()).read_text()
    assert "<h2>Counts per step" in html and "No input was rejected" in html and "<svg" not in html


def test_histogram_bars_match_numpy():
    values = np.random.default_rng(0).normal(0.5, 0.15, 500)
    bins = np.linspace(0, 1, 21)
    svg = histogram_svg(values, bins, "t", "x", marker=0.6, marker_label="threshold")
    counts = [int(c) for c in re.findall(r"\): (\d+)</title></rect>", svg)]
    expected, _ = np.histogram(values, bins)
    assert counts == [int(c) for c in expected if c > 0]
    assert "stroke-dasharray" in svg and "threshold" in svg
    assert "no values" in histogram_svg(np.array([np.nan]), bins, "empty", "x")


def test_report_reads_the_manifest_one_partition_at_a_time(finished_run, monkeypatch):
    run, table = finished_run
    seen = []
    for cls in (Tally, Shown):
        add = cls.add

        def recording(self, part, add=add):
            seen.append(set(part.column("partition").to_pylist()) if "partition" in part.column_names else None)
            return add(self, part)

        monkeypatch.setattr(cls, "add", recording)
    monkeypatch.setattr("curate.report.tally.COLUMNS", (*COLUMNS, "partition"))
    write_report(run, ReportConfig(), DecodeLimits(), 0.6, 0.45)
    assert len(seen) == 4 and all(len(s) == 1 for s in seen)  # two passes over the fixture's two partitions


def test_tally_of_partitions_equals_tally_of_the_whole(finished_run):
    _, table = finished_run
    levels = ["cluster_l1"]
    whole, parts = Tally(levels), Tally(levels)
    whole.add(table)
    for p in sorted(set(table.column("partition").to_pylist())):
        parts.add(table.filter(pc.equal(table.column("partition"), p)))
    assert whole.statuses() == parts.statuses() and whole.references == parts.references
    assert whole.group_sizes == parts.group_sizes and whole.duplicate_kind == parts.duplicate_kind
    assert (whole.nn_hist == parts.nn_hist).all() and (whole.eval_hist == parts.eval_hist).all()
    assert (whole.cluster_sizes[0] == parts.cluster_sizes[0]).all()
    assert {k: n for k, (n, _) in whole.rejections.items()} == {k: n for k, (n, _) in parts.rejections.items()}
    assert whole.choose(2, 3, 0).clusters == parts.choose(2, 3, 0).clusters
