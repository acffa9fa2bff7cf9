"""The steps after embed stream (issue 25.2): on a synthetic run directory (bench/bench_curate_memory.py's), reading
embeddings in small chunks gives the same manifest, clusters and duplicate groups as in large ones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import curate.steps.shard  # noqa: E402
from bench.bench_curate_memory import build_run, parse_args  # noqa: E402
from curate.config import load_curate_config  # noqa: E402
from curate.embedding.rows import EmbeddingRows  # noqa: E402
from curate.manifest import check_accounting, read_manifest  # noqa: E402
from curate.rundir import RunDir  # noqa: E402
from curate.steps import run_step  # noqa: E402

STEPS = ("dedup", "cluster", "retrieve", "shard", "report")


def _run(root: Path, steps_run: list[str] | None = None) -> RunDir:
    """The synthetic run curated step by step (`steps_run`: the step running now is appended before it starts)."""
    args = parse_args(["--seeds", "40", "--evals", "40", "--partitions", "3", "--clusters", "12", "--nlist", "8"])
    cfg = load_curate_config(build_run(root, 1500, args))
    for step in STEPS:
        if steps_run is not None:
            steps_run.append(step)
        assert run_step(step, cfg).status == "done", step
    return RunDir(cfg.run_dir)


@pytest.fixture(scope="module")
def large_chunks(tmp_path_factory) -> RunDir:
    return _run(tmp_path_factory.mktemp("large"))


def test_small_chunks_give_the_same_run(large_chunks, tmp_path, monkeypatch):
    for name in ("curate.embedding.rows.CHUNK_ROWS", "curate.selection.cluster.CHUNK_ROWS",
                 "curate.selection.retrieve.CHUNK_ROWS", "curate.knn.index.ADD_CHUNK"):
        monkeypatch.setattr(name, 97)
    steps_run, reads = [], []  # reads: (step, rows of the embeddings read from, rows read at once)
    whole_read = EmbeddingRows.__getitem__

    def recording(self, index):
        out = whole_read(self, index)
        reads.append((steps_run[-1], len(self), len(out)))
        return out

    monkeypatch.setattr(EmbeddingRows, "__getitem__", recording)
    small = _run(tmp_path, steps_run)
    # dedup and retrieve read the pool's ~1,500 embeddings a partition (~500 rows), an IVF training sample (512) or
    # a chunk at a time, never whole (k-means trains on a sample that is the whole pool at this size; a seed or
    # evaluation set of 40 is read whole)
    pool_reads = [got for step, rows, got in reads if step in ("dedup", "retrieve") and rows > 1000]
    assert pool_reads and max(pool_reads) <= 600
    # `file` names each run's own byte file; every other column must be equal
    assert read_manifest(small.manifest).drop_columns(["file"]).equals(
        read_manifest(large_chunks.manifest).drop_columns(["file"]))
    for name in ("level1_centroids.npy", "level2_centroids.npy"):
        assert (small.clusters / name).read_bytes() == (large_chunks.clusters / name).read_bytes()
    assert (small.dedup / "groups.parquet").read_bytes() == (large_chunks.dedup / "groups.parquet").read_bytes()


def test_the_synthetic_run_is_curated_and_accounted_for(large_chunks):
    table = read_manifest(large_chunks.manifest)
    counts = check_accounting(table, final=True)
    assert counts["duplicate"] > 0 and counts["contaminated"] > 0 and counts["selected"] > 0
    assert sorted(p.name for p in large_chunks.manifest.iterdir()) == [f"part-{p:05d}.parquet" for p in range(3)]
    assert len(list(large_chunks.shards.glob("*.tar"))) >= 1


def test_shard_reads_the_selected_rows_one_partition_at_a_time(large_chunks, monkeypatch):
    before = {p.name: p.read_bytes() for p in large_chunks.shards.glob("*.tar")}
    calls = []
    real = curate.steps.shard.read_manifest

    def recording(path, columns=None, partitions=None, where=None):
        calls.append(partitions)
        return real(path, columns, partitions, where)

    monkeypatch.setattr(curate.steps.shard, "read_manifest", recording)
    cfg = load_curate_config(large_chunks.root.parent.parent / "memory.yaml")
    assert run_step("shard", cfg, force=True).status == "done"
    assert calls == [[0], [1], [2]]
    assert {p.name: p.read_bytes() for p in large_chunks.shards.glob("*.tar")} == before
