"""A release's data facts name the curation run and hash its manifest, a folder of partition files behind a link."""

from __future__ import annotations

import pyarrow as pa

from curate.manifest_files import ManifestWriter
from dinoforge.data.shard_index import ShardEntry, write_index
from dinoforge.hashing import file_sha256, path_sha256
from pretrain.release_facts import _data_facts


def _curation_run(tmp_path, sample_ids):
    run = tmp_path / "curation_run"
    (run / "shards").mkdir(parents=True)
    write_index(run / "shards", [ShardEntry("shard-000000.tar", 2, 10, "0" * 64, 0, "a", "b")], {"run": "pool_v1"})
    with ManifestWriter(run / "manifest.parquet") as writer:
        writer.write(pa.table({"sample_id": sample_ids, "partition": [0, 1]}))
    return run


def test_data_facts_hash_the_partitioned_manifest_and_change_with_it(tmp_path):
    run = _curation_run(tmp_path, ["a", "b"])
    config = {"data": {"dataset": f"wds:{run / 'shards'}"}}
    facts = _data_facts(config, [])
    assert facts["images"] == 2 and facts["curation_run"] == "pool_v1"
    assert facts["manifest"] == str(run / "manifest.parquet")
    assert facts["manifest_sha256"] == path_sha256(run / "manifest.parquet")
    with ManifestWriter(run / "manifest.parquet") as writer:  # a new version with one row changed
        writer.write(pa.table({"sample_id": ["a", "c"], "partition": [0, 1]}))
    assert _data_facts(config, [])["manifest_sha256"] != facts["manifest_sha256"]


def test_path_sha256_of_a_folder_covers_names_and_bytes_and_not_where_it_lies(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        (folder / "part-00000.parquet").write_bytes(b"rows")
    (tmp_path / "link").symlink_to(one)
    assert path_sha256(one) == path_sha256(two) == path_sha256(tmp_path / "link")
    (two / "part-00000.parquet").rename(two / "part-00001.parquet")
    assert path_sha256(two) != path_sha256(one)
    before = path_sha256(one)
    (one / "part-00000.parquet").write_bytes(b"rowz")
    assert path_sha256(one) != before
    assert path_sha256(one / "part-00000.parquet") == file_sha256(one / "part-00000.parquet")
