"""Issue 26 point 3: links out of a source. By default a symlink that resolves outside the source folder is a rejected
row ("link leaves the source"), unread; `follow_symlinks: all` follows it, `none` rejects every link; no byte of a
rejected file's content reaches the manifest or the report."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from curate.config import load_curate_config
from curate.rundir import RunDir
from curate.sources.ingest import IngestConfig, SourceConfig, ingest_sources
from curate.steps import run_step
from dinoforge.config import ConfigError

SECRET = b"root:x:0:0:SECRET-TOKEN-4711:/root:/bin/bash\n"


@pytest.fixture
def pool(tmp_path) -> Path:
    """pool/ with real images, a link inside it, and links to an image, a private text file and a folder outside."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(outside / "photo.png")
    Image.new("RGB", (32, 32), (4, 5, 6)).save(outside / "dir" / "deep.png")
    (outside / "passwd").write_bytes(SECRET * 4)
    pool = tmp_path / "pool"
    (pool / "sub").mkdir(parents=True)
    Image.new("RGB", (32, 32), (7, 8, 9)).save(pool / "real.png")
    Image.new("RGB", (32, 32), (9, 8, 7)).save(pool / "sub" / "inner.png")
    os.symlink(pool / "sub" / "inner.png", pool / "in_link.png")  # stays inside
    os.symlink("../outside/photo.png", pool / "out_photo.png")  # relative, leaves
    os.symlink(outside / "passwd", pool / "passwd.jpg")
    os.symlink(outside / "dir", pool / "out_dir")
    return pool


def _rows(pool: Path, **source) -> dict[str, dict]:
    rows = ingest_sources([("pool", SourceConfig(str(pool), **source))], IngestConfig(), n_partitions=1).to_pylist()
    assert len({r["locator"] for r in rows}) == len(rows)  # one row per entry
    return {r["locator"]: r for r in rows}


def test_default_rejects_links_that_leave_the_source_unread(pool):
    # An ancestor stands for "/": followed, the walk would leave the source for everything above it.
    os.symlink(pool.parent, pool / "root_link")
    os.symlink(pool.parent / "outside" / "photo.png", pool / ".hidden_link.png")
    rows = _rows(pool)
    assert sorted(rows) == [".hidden_link.png", "in_link.png", "out_dir", "out_photo.png", "passwd.jpg", "real.png",
                            "root_link", "sub/inner.png"]
    assert rows[".hidden_link.png"]["reject_reason"].startswith("hidden file")  # the hidden rule comes first
    for name in ("out_dir", "out_photo.png", "passwd.jpg", "root_link"):
        assert rows[name]["reject_reason"].startswith(f"link leaves the source: {pool / name} -> "), name
        assert (rows[name]["size"], rows[name]["sha256"], rows[name]["format"]) == (None, None, None)  # unread
    assert rows["root_link"]["reject_reason"].startswith(f"link leaves the source: {pool / 'root_link'} -> "
                                                         f"{os.path.realpath(pool.parent)} ")
    assert {k for k, r in rows.items() if r["reject_reason"] is None} == {"in_link.png", "real.png", "sub/inner.png"}


def test_all_follows_links_anywhere(pool):
    rows = _rows(pool, follow_symlinks="all")
    assert {k for k, r in rows.items() if r["reject_reason"] is None} == {
        "in_link.png", "out_dir/deep.png", "out_photo.png", "real.png", "sub/inner.png"}
    assert rows["passwd.jpg"]["reject_reason"].startswith("not an image")
    assert "SECRET" not in rows["passwd.jpg"]["reject_reason"] and "root:" not in rows["passwd.jpg"]["reject_reason"]


def test_none_rejects_every_link(pool):
    rows = _rows(pool, follow_symlinks="none")
    for name in ("in_link.png", "out_dir", "out_photo.png", "passwd.jpg"):
        assert rows[name]["reject_reason"].startswith("symbolic link, not followed (follow_symlinks: none)"), name
        assert rows[name]["size"] is None
    assert {k for k, r in rows.items() if r["reject_reason"] is None} == {"real.png", "sub/inner.png"}


def test_file_lists_follow_listed_links_unless_none(pool, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{pool / 'out_photo.png'}\n{pool / 'real.png'}\n")
    src = [("pool", SourceConfig(str(listing), kind="filelist", name="list"))]
    assert all(r["reject_reason"] is None for r in ingest_sources(src, IngestConfig(), 1).to_pylist())
    src = [("pool", SourceConfig(str(listing), kind="filelist", name="list", follow_symlinks="none"))]
    reasons = [r["reject_reason"] for r in ingest_sources(src, IngestConfig(), 1).to_pylist()]
    assert reasons[0].startswith("symbolic link, not followed") and reasons[1] is None


@pytest.mark.parametrize("follow", ["inside", "all"])
def test_no_byte_of_a_rejected_file_reaches_manifest_or_report(pool, tmp_path, follow):
    config = tmp_path / f"{follow}.yaml"
    config.write_text(yaml.safe_dump({"name": follow, "runs_root": str(tmp_path / "runs"), "partitions": 1,
                                      "sources": [{"path": str(pool), "name": "pool", "follow_symlinks": follow}]}))
    cfg = load_curate_config(config)
    run_step("ingest", cfg)
    run_step("report", cfg)
    run = RunDir(cfg.run_dir)
    manifest_files = sorted(p for p in run.manifest.resolve().rglob("*") if p.is_file())
    assert manifest_files, run.manifest  # the manifest is a folder of partition files behind its link
    for path in (*manifest_files, run.report / "index.html"):
        data = path.read_bytes()
        assert b"SECRET" not in data and b"root:x" not in data, path
    reason = b"link leaves the source" if follow == "inside" else b"not an image"
    assert reason in (run.report / "index.html").read_bytes()  # the rejections are there, with their reasons


def test_follow_symlinks_is_checked(tmp_path):
    with pytest.raises(ValueError, match="follow_symlinks='some'"):
        SourceConfig(str(tmp_path), follow_symlinks="some")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"path": str(tmp_path), "follow_symlinks": "yes"}]}))
    with pytest.raises(ConfigError, match="follow_symlinks='yes'.*inside, all, none"):
        load_curate_config(config)
