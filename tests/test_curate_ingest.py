"""Ingest: readers for folders, tars, WebDataset shards and file lists; safe probing; one manifest row per input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from curate_photos import photo_paths
from PIL import Image

from curate.partition import parse_partition_list, partition_of
from curate.sources.decode import DecodeLimits, ImageRejected, decode_rgb, probe_image
from curate.sources.ingest import IngestConfig, SourceConfig, ingest_sources
from curate.sources.readers import SourceError, expand_shards, make_uid, read_source
from curate.sources.sample_reader import SampleReader

LIMITS = DecodeLimits(max_pixels=4_000_000, min_side=16)


def _png(size=(64, 48), mode="RGB", color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def _tiff_float(size) -> bytes:
    buf = io.BytesIO()
    Image.new("F", size, 0.5).save(buf, format="TIFF")
    return buf.getvalue()


def _bad_header_crc(png: bytes) -> bytes:
    """`png` with one byte of its IHDR chunk's CRC flipped (8-byte signature, then length, type, 13 bytes, CRC)."""
    data = bytearray(png)
    data[8 + 4 + 4 + 13] ^= 0xFF
    return bytes(data)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [p.read_bytes() for p in photo_paths("imagenette", per_class=1)[:6]]


# --- decode probe -----------------------------------------------------------------------------------------------


def test_probe_accepts_real_photo_and_reports_header(photos):
    probe = probe_image(photos[0], LIMITS)
    img = Image.open(io.BytesIO(photos[0]))
    assert probe.ok and (probe.format, probe.width, probe.height) == ("JPEG", *img.size)


@pytest.mark.parametrize("make, reason", [
    (lambda p: b"", "empty file (0 bytes)"),
    (lambda p: p[: len(p) // 2], "truncated or corrupt image data"),
    (lambda p: b"hello, I am a text file\n" * 20, "not an image"),
    (lambda p: _png((4000, 2000), mode="1"), "decompression bomb: 4000x2000 = 8000000 pixels > limit 4000000"),
    (lambda p: _png((8, 100)), "too small: 8x100"),
    (lambda p: _tiff_float((64, 64)), "unsupported mode F"),
    (lambda p: _bad_header_crc(_png()), "corrupt PNG: SyntaxError: broken PNG file (bad header checksum in b'IHDR')"),
])
def test_probe_rejections_have_specific_reasons(photos, make, reason):
    probe = probe_image(make(photos[0]), LIMITS)
    assert not probe.ok and probe.reject_reason.startswith(reason), probe.reject_reason
    with pytest.raises(ImageRejected, match=re.escape(reason.split(":")[0])):
        decode_rgb(make(photos[0]), LIMITS)


def test_sixteen_bit_greyscale_png_is_accepted_and_scaled_to_eight_bits():
    from dinoforge.data.decode import decode_image

    values = np.array([0, 256, 257, 1000, 32768, 65279, 65535] * 3, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.tile(values, (20, 1))).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    probe = probe_image(buf.getvalue(), LIMITS)
    assert probe.ok and probe.mode == "I;16"
    rgb = np.asarray(decode_rgb(buf.getvalue(), LIMITS))
    np.testing.assert_array_equal(rgb[0, :7, 0], [0, 0, 1, 3, 127, 254, 255])  # v / 257, not clipped at 255
    assert (rgb == rgb[..., :1]).all()  # grey
    np.testing.assert_array_equal(rgb, np.asarray(decode_image(buf.getvalue())))  # as pretraining decodes it


def test_probe_rejects_unlisted_format():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="BMP")
    probe = probe_image(buf.getvalue(), DecodeLimits(formats=["JPEG", "PNG"]))
    assert probe.reject_reason.startswith("unsupported format BMP")


def test_decode_rgb_composites_alpha_on_white():
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(buf, format="PNG")  # fully transparent red
    img = decode_rgb(buf.getvalue(), LIMITS)
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (255, 255, 255)


# --- readers ----------------------------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def messy_sources(tmp_path: Path, photos) -> dict:
    """One source of each kind with good and bad inputs; returns the SourceConfigs and the expected reasons."""
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(photos[0])
    (folder / "sub" / "b.jpg").write_bytes(photos[1])
    (folder / "sub" / "copy_of_a.jpg").write_bytes(photos[0])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(photos[2][:3000])
    (folder / "notes.txt").write_text("not a picture")
    (folder / ".DS_Store").write_bytes(b"\0\1")  # hidden: a rejected row, not read
    (folder / ".thumbs").mkdir()
    (folder / ".thumbs" / "a.jpg").write_bytes(photos[0])  # inside a hidden folder: the folder is one rejected row
    os.symlink(tmp_path / "nowhere.jpg", folder / "dangling.jpg")

    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        _add(tar, "good.jpg", photos[3])
        _add(tar, "../escape.jpg", photos[3])
        _add(tar, "/abs/path.jpg", photos[3])
        _add(tar, "link.jpg", b"", type=tarfile.SYMTYPE, linkname="good.jpg")
        _add(tar, "bomb.png", _png((4000, 2000), mode="1"))
    gz = tmp_path / "packed.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        _add(tar, "x/one.jpg", photos[4])
    cut_tar = tmp_path / "cut.tar"
    with tarfile.open(cut_tar, "w") as tar:
        _add(tar, "first.jpg", photos[0])
        _add(tar, "second.jpg", photos[1])
    cut_tar.write_bytes(cut_tar.read_bytes()[: 512 + len(photos[0]) + 512 + 700])  # dies inside the second member

    wds_dir = tmp_path / "wds"
    wds_dir.mkdir()
    for s in range(2):
        with tarfile.open(wds_dir / f"shard-{s:03d}.tar", "w") as tar:
            _add(tar, f"s{s}_k0.jpg", photos[s])
            _add(tar, f"s{s}_k0.json", json.dumps({"label": s}).encode())
            _add(tar, f"s{s}_k1.json", b"{}")  # a sample without an image
            _add(tar, f"s{s}_k2.seg.png", _png())  # multi-dot extension: key s{s}_k2, ext seg.png
    filelist = tmp_path / "list.txt"
    filelist.write_text(f"# photos\nfolder/a.jpg\n\n{folder / 'sub' / 'b.jpg'}\nmissing.jpg\nfolder/a.jpg\n")
    sources = [
        ("pool", SourceConfig(str(folder), name="folder")),
        ("pool", SourceConfig(str(plain))),
        ("pool", SourceConfig(str(gz), kind="tar")),
        ("pool", SourceConfig(str(cut_tar))),
        ("seed", SourceConfig(str(wds_dir / "shard-{000..001}.tar"), name="wds")),
        ("eval", SourceConfig(str(filelist), name="list")),
    ]
    expected = {  # (source, locator) -> expected reason prefix (None = accepted)
        ("folder", "a.jpg"): None, ("folder", "sub/b.jpg"): None, ("folder", "sub/copy_of_a.jpg"): None,
        ("folder", "empty.jpg"): "empty file", ("folder", "cut.jpg"): "truncated or corrupt",
        ("folder", "notes.txt"): "not an image", ("folder", "dangling.jpg"): "broken symlink",
        ("folder", ".DS_Store"): "hidden file", ("folder", ".thumbs"): "hidden folder",
        ("plain", "good.jpg"): None, ("plain", "../escape.jpg"): "path escapes the tar",
        ("plain", "/abs/path.jpg"): "path escapes the tar", ("plain", "link.jpg"): "tar member is a link",
        ("plain", "bomb.png"): "decompression bomb",
        ("packed", "x/one.jpg"): None,
        ("cut", "first.jpg"): None, ("cut", "second.jpg"): "unreadable tar member",
        ("wds", "shard-000.tar/s0_k0"): None, ("wds", "shard-000.tar/s0_k1"): "sample has no image member",
        ("wds", "shard-000.tar/s0_k2"): None, ("wds", "shard-001.tar/s1_k0"): None,
        ("wds", "shard-001.tar/s1_k1"): "sample has no image member", ("wds", "shard-001.tar/s1_k2"): None,
        ("list", "folder/a.jpg"): None, ("list", str(folder / "sub" / "b.jpg")): None,
        ("list", "missing.jpg"): "file not found",
    }
    return {"sources": sources, "expected": expected, "root": tmp_path}


def test_ingest_one_row_per_input_with_reasons(messy_sources):
    table = ingest_sources(messy_sources["sources"], IngestConfig(limits=LIMITS), n_partitions=4)
    rows = table.to_pylist()
    by_key = {}
    for r in rows:
        by_key.setdefault((r["source"], r["locator"]), []).append(r)
    expected = messy_sources["expected"]
    # The cut tar may end with an extra "truncated" row; the file list names folder/a.jpg twice (two inputs).
    extra = {k for k in by_key if k not in expected}
    assert all(k[0] == "cut" and "truncated" in k[1] for k in extra), extra
    assert len(by_key[("list", "folder/a.jpg")]) == 2
    assert len(rows) == len(expected) + 1 + len(extra)
    for key, want in expected.items():
        for r in by_key[key]:
            if want is None:
                assert r["status"] == "ok" and r["reject_reason"] is None, (key, r["reject_reason"])
            else:
                assert r["status"] == "rejected" and r["reject_reason"].startswith(want), (key, r["reject_reason"])
                assert r["reason"] == r["reject_reason"]
    roles = {r["source"]: r["role"] for r in rows}
    assert roles == {"folder": "pool", "plain": "pool", "packed": "pool", "cut": "pool", "wds": "seed",
                     "list": "eval"}
    uids = [r["uid"] for r in rows]
    assert len(set(uids)) == len(uids)
    for r in rows:
        assert r["partition"] == partition_of(r["uid"], 4)
    first = by_key[("folder", "a.jpg")][0]
    assert first["uid"] == make_uid("folder", "a.jpg")


def test_ingest_hashes_and_sizes_match_bytes(messy_sources, photos):
    table = ingest_sources(messy_sources["sources"], IngestConfig(limits=LIMITS), n_partitions=2)
    rows = {(r["source"], r["locator"]): r for r in table.to_pylist()}
    a = rows[("folder", "a.jpg")]
    assert a["sha256"] == hashlib.sha256(photos[0]).hexdigest() and a["size"] == len(photos[0])
    assert (a["width"], a["height"]) == Image.open(io.BytesIO(photos[0])).size
    assert rows[("folder", "sub/copy_of_a.jpg")]["sha256"] == a["sha256"]
    # Re-reading through the manifest's locations gives the same bytes: plain file, seekable tar, gzip tar, shard.
    with SampleReader() as reader:
        keys = [("folder", "a.jpg"), ("plain", "good.jpg"), ("packed", "x/one.jpg"), ("wds", "shard-001.tar/s1_k0")]
        for key in keys:
            r = rows[key]
            data = reader.read(r["file"], r["member"], r["offset"], r["size"])
            assert hashlib.sha256(data).hexdigest() == r["sha256"], key
    assert rows[("plain", "good.jpg")]["offset"] is not None and rows[("packed", "x/one.jpg")]["offset"] is None


def test_ingest_is_deterministic_and_workers_agree(messy_sources):
    cfg = IngestConfig(limits=LIMITS)
    first = ingest_sources(messy_sources["sources"], cfg, n_partitions=3)
    again = ingest_sources(messy_sources["sources"], cfg, n_partitions=3)
    parallel = ingest_sources(messy_sources["sources"], IngestConfig(limits=LIMITS, num_workers=2, chunksize=3), 3)
    assert first.equals(again) and first.equals(parallel)


def test_source_errors_name_the_problem(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list(read_source(str(tmp_path / "nope"), "folder", "x", 1 << 20))
    with pytest.raises(SourceError, match="does not exist"):
        list(read_source(str(tmp_path / "data.bin"), "auto", "x", 1 << 20))
    (tmp_path / "data.bin").write_bytes(b"")
    with pytest.raises(SourceError, match="cannot guess the kind"):
        list(read_source(str(tmp_path / "data.bin"), "auto", "x", 1 << 20))
    with pytest.raises(SourceError, match="unknown kind"):
        list(read_source(str(tmp_path), "s3", "x", 1 << 20))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dup = [("pool", SourceConfig(str(tmp_path / "a"), name="same")), ("seed", SourceConfig(str(tmp_path / "b"),
                                                                                           name="same"))]
    with pytest.raises(SourceError, match="two sources are named 'same'"):
        ingest_sources(dup, IngestConfig(), 1)


def test_a_source_without_inputs_or_a_binary_file_list_is_an_error_naming_it(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "pool" / "a.png")
    cases = [(SourceConfig(str(tmp_path / "empty")), f"seed source 'empty': {tmp_path / 'empty'} holds no inputs"),
             (SourceConfig(str(tmp_path / "pool" / "a.png"), kind="filelist", name="list"),
              f"source 'list': {tmp_path / 'pool' / 'a.png'}: not a file list (not UTF-8 text")]
    for src, message in cases:
        with pytest.raises(SourceError, match=re.escape(message)):
            ingest_sources([("pool", SourceConfig(str(tmp_path / "pool"))), ("seed", src)], IngestConfig(), 1)


def test_symlinks_are_followed_and_loops_are_rejected_rows(tmp_path):
    """With follow_symlinks: all, symlinked folders and files are read like real ones; a folder reached twice (a loop,
    a second link) is one rejected row, so the walk ends and every entry of the tree still has its row."""
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(outside / "deep" / "x.png")
    Image.new("RGB", (32, 32), (7, 7, 7)).save(outside / "y.png")
    pool = tmp_path / "pool"
    (pool / "real").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(pool / "real" / "z.png")
    os.symlink(outside, pool / "linked")
    os.symlink(outside, pool / "second_link")
    os.symlink(outside / "y.png", pool / "file_link.png")
    os.symlink(pool, pool / "real" / "loop")
    table = ingest_sources([("pool", SourceConfig(str(pool), follow_symlinks="all"))], IngestConfig(), 1)
    rows = {r["locator"]: r["reject_reason"] for r in table.to_pylist()}
    assert sorted(rows) == ["file_link.png", "linked/deep/x.png", "linked/y.png", "real/loop", "real/z.png",
                            "second_link"]
    assert {k for k, reason in rows.items() if reason is None} == {"file_link.png", "linked/deep/x.png",
                                                                   "linked/y.png", "real/z.png"}
    assert rows["second_link"].startswith(f"link to a folder read already ({pool / 'second_link'} -> {outside})")
    assert rows["real/loop"].startswith("link to a folder read already")


def test_a_folder_that_cannot_be_listed_is_a_rejected_row(tmp_path, monkeypatch):
    (tmp_path / "open").mkdir()
    (tmp_path / "locked").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "open" / "a.png")
    scandir = os.scandir

    def refuse_locked(path):  # chmod cannot lock out root, who runs these tests in CI containers
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)
    rows = {r.locator: r.reject_reason for r in read_source(str(tmp_path), "folder", "p", 1 << 20)}
    assert rows == {"open/a.png": None, "locked": "unreadable folder: Permission denied"}


def test_oversize_file_rejected_without_reading(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"\xff" * 5000)
    table = ingest_sources([("pool", SourceConfig(str(tmp_path)))], IngestConfig(max_bytes=4096), 1)
    assert table.column("reject_reason").to_pylist() == ["file too large: 5000 bytes > limit 4096"]


def test_gzip_detection_does_not_confuse_plain_tars(tmp_path, photos):
    path = tmp_path / "raw.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.jpg", photos[0])
    rows = ingest_sources([("pool", SourceConfig(str(path)))], IngestConfig(), 1).to_pylist()
    assert rows[0]["offset"] == 512 and rows[0]["status"] == "ok"  # read in place: random access later


def test_members_of_no_sample_are_rejected_rows_with_their_own_uids(tmp_path, photos):
    """What makes no usable sample (a member without an extension, a second .jpg, a key coming back) is a rejected row
    of its own, so every member of a shard is accounted for and no two rows share a uid."""
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.jpg", photos[0]), ("a.JPG", photos[1]), ("README", b"hi"), ("b.jpg", photos[2]),
                           ("a.json", b"{}")):
            _add(tar, name, data)
    rows = {r.locator: r.reject_reason for r in read_source(str(shard), "webdataset", "w", 1 << 20)}
    assert rows["s.tar/a"] is None and rows["s.tar/b"] is None
    assert rows["s.tar/a.JPG"] == "duplicate member .jpg for key 'a'"
    assert rows["s.tar/README"].startswith("member name has no extension")
    assert "appears again" in rows["s.tar/a.json"] and len(rows) == 5


def test_folder_of_shards_includes_compressed_ones(tmp_path, photos):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, mode in (("a.tar", "w"), ("b.tar.gz", "w:gz"), ("c.tgz", "w:gz")):
        with tarfile.open(shards / name, mode) as tar:
            _add(tar, f"{name[0]}0.jpg", photos[0])
    (shards / "notes.txt").write_text("not a shard")
    assert [Path(p).name for p in expand_shards(str(shards), "s")] == ["a.tar", "b.tar.gz", "c.tgz"]


# --- partitions -------------------------------------------------------------------------------------------------


def test_partition_is_stable_and_roughly_uniform():
    uids = [make_uid("s", f"img{i}.jpg") for i in range(4000)]
    parts = np.array([partition_of(u, 8) for u in uids])
    # a pure function of the uid: another process, with another hash salt, agrees
    code = "from curate.partition import partition_of; print(partition_of('img0.jpg', 1009))"
    other = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "123"},
                           capture_output=True, text=True, check=True)
    assert int(other.stdout) == partition_of("img0.jpg", 1009)
    counts = np.bincount(parts, minlength=8)
    assert counts.min() > 400 and counts.max() < 600  # expected 500 +- 3 sigma (~ 63)
    assert partition_of("anything", 1) == 0


def test_parse_partition_list():
    assert parse_partition_list("1,4,9-11", 16) == [1, 4, 9, 10, 11]
    with pytest.raises(ValueError, match="outside 0..7"):
        parse_partition_list("6-8", 8)
    with pytest.raises(ValueError, match="bad partition list"):
        parse_partition_list("a-b", 8)
