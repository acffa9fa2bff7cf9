"""Shards: planning by count and bytes, deterministic tars, temp-name-then-rename, index checksums."""

from __future__ import annotations

import hashlib
import json
import random
import tarfile

import pytest
import webdataset as wds

from curate.shards.writer import ShardWriter, plan_shards, shard_name, verify_shards
from dinoforge.data.shard_index import read_index, write_index
from dinoforge.hashing import file_sha256


def _check_plan(sizes: list[int], max_count: int, max_bytes: int) -> None:
    ranges = plan_shards(sizes, max_count, max_bytes)
    assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]]  # contiguous
    assert (ranges[-1][1] if ranges else 0) == len(sizes)  # covering
    for k, (a, b) in enumerate(ranges):
        total = sum(sizes[a:b])
        assert b - a <= max_count
        assert total <= max_bytes or b - a == 1  # only a single oversize sample may exceed the byte limit
        if k + 1 < len(ranges):  # greedy: the next sample would have broken a limit
            assert b - a == max_count or total + sizes[b] > max_bytes


@pytest.mark.parametrize("seed", range(20))
def test_plan_respects_limits_and_is_greedy(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([1, 10, 100, 1000, 5000]) for _ in range(rng.randint(0, 200))]
    _check_plan(sizes, max_count=rng.randint(1, 30), max_bytes=rng.randint(500, 20_000))


def test_plan_examples():
    assert plan_shards([5, 5, 5, 20, 1, 1], 3, 12) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert plan_shards([], 3, 12) == []
    with pytest.raises(ValueError, match="shard limits must be positive"):
        plan_shards([1], 0, 10)


def _write(path, samples):
    writer = ShardWriter(path, partition=3)
    for key, members in samples:
        writer.write(key, members)
    return writer.close()


SAMPLES = [(f"{i:024x}", {"jpg": bytes([i]) * (100 + i), "json": json.dumps({"i": i}).encode()}) for i in range(5)]


def test_shard_is_deterministic_and_readable_by_webdataset(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    info_a = _write(tmp_path / "a" / shard_name("curated", 0), SAMPLES)
    info_b = _write(tmp_path / "b" / shard_name("curated", 0), SAMPLES)
    path = tmp_path / "a" / "curated-000000.tar"
    assert path.read_bytes() == (tmp_path / "b" / "curated-000000.tar").read_bytes()
    assert info_a == info_b
    assert info_a.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert (info_a.count, info_a.bytes, info_a.partition) == (5, path.stat().st_size, 3)
    assert (info_a.first_key, info_a.last_key) == (SAMPLES[0][0], SAMPLES[-1][0])
    got = [(s["__key__"], s["jpg"], json.loads(s["json"])) for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert got == [(k, m["jpg"], json.loads(m["json"])) for k, m in SAMPLES]
    with tarfile.open(path) as tar:
        info = tar.getmember(f"{SAMPLES[0][0]}.jpg")
        assert (info.mtime, info.uid, info.mode) == (0, 0, 0o644)


def test_shard_appears_only_when_complete(tmp_path):
    final = tmp_path / "curated-000001.tar"
    writer = ShardWriter(final)
    writer.write("k0", {"jpg": b"x" * 10})
    assert not final.exists() and writer.tmp.exists()  # readers globbing *.tar never see a partial shard
    writer.close()
    assert final.exists() and not writer.tmp.exists()
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "curated-000002.tar") as w:
        w.write("k1", {"jpg": b"y"})
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated-000001.tar"]


def test_bad_keys_are_refused(tmp_path):
    writer = ShardWriter(tmp_path / "s.tar")
    for key in ("", "a.b", "a/b"):
        with pytest.raises(ValueError, match="bad WebDataset key"):
            writer.write(key, {"jpg": b""})
    writer.abort()
    assert not list(tmp_path.iterdir())


def test_index_lists_checksums_and_verify_finds_damage(tmp_path):
    infos = [_write(tmp_path / shard_name("curated", i), SAMPLES[i * 2:i * 2 + 2]) for i in range(3)]
    write_index(tmp_path, infos, {"run": "test"})
    doc = json.loads((tmp_path / "index.json").read_text())
    assert doc["total_samples"] == 5 and doc["n_shards"] == 3 and doc["run"] == "test"
    assert doc["version"] == 1 and read_index(tmp_path).shards == infos
    assert verify_shards(tmp_path) == []
    damaged = tmp_path / infos[1].file
    data = bytearray(damaged.read_bytes())
    data[600] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert verify_shards(tmp_path) == ["curated-000001.tar: sha256 differs from index"]
    (tmp_path / infos[2].file).unlink()
    assert verify_shards(tmp_path)[-1] == "curated-000002.tar: missing"
