"""curate.knn.index: approximate indexes (IVF, IVF-PQ) with measured recall, auto's choice, config errors, and the
`index:` section driving dedup end to end (`python -m curate run CONFIG index.kind=ivf index.nlist=8`)."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest
import yaml
from curate_photos import photo_paths
from PIL import Image

from curate.config import load_curate_config
from curate.dedup.config import COPYDETECT_THRESHOLDS
from curate.dedup.kernels import near_duplicates
from curate.dedup.partitions import query_partition
from curate.knn.graph import range_pairs
from curate.knn.index import AUTO_THRESHOLD, RERANK_FACTOR, IndexConfig, build_index, plan_index
from curate.rundir import RunDir
from dinoforge.config import ConfigError


def planted(n: int, d: int = 64, copies: float = 0.1, seed: int = 0) -> np.ndarray:
    """Unit rows, the last `copies` share noisy copies of earlier rows (cosine ~0.86 with their source)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n_dup = int(n * copies)
    src = rng.integers(0, n - n_dup, n_dup)
    x[n - n_dup:] = x[src] + (0.6 / np.sqrt(d)) * rng.standard_normal((n_dup, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pairs(edges: tuple[np.ndarray, np.ndarray, np.ndarray]) -> set[tuple[int, int]]:
    return set(zip(edges[0].tolist(), edges[1].tolist(), strict=True))


@pytest.mark.parametrize("cfg", [IndexConfig(kind="ivf", nprobe=16), IndexConfig(kind="ivfpq", nprobe=16, pq_m=8)],
                         ids=["ivf", "ivfpq"])
def test_approximate_index_finds_the_planted_copy_pairs(cfg):
    x = planted(4000)
    exact = pairs(range_pairs(x, 16, 0.6, use_gpu="cpu"))
    assert len(exact) >= 400  # every planted copy, and copies of one source among themselves
    found = range_pairs(x, 16, 0.6, use_gpu="cpu", index_cfg=cfg)
    assert len(pairs(found) & exact) >= 0.99 * len(exact)
    assert pairs(found) <= exact  # it may miss a pair, never invent one
    # ivfpq re-ranks with exact inner products: its similarities are the flat index's
    np.testing.assert_allclose(found[2], np.einsum("nd,nd->n", x[found[0]], x[found[1]]), atol=1e-5)


def test_auto_is_flat_below_the_threshold_and_ivf_from_it():
    cfg = IndexConfig(auto_threshold=100)
    assert plan_index(cfg, 99, 16).kind == "flat"
    plan = plan_index(cfg, 100, 16)
    assert (plan.kind, plan.nlist, plan.nprobe) == ("ivf", 40, 40)  # 4 sqrt(100) cells; nprobe capped by them
    assert "auto" in plan.reason and "100" in plan.reason
    assert build_index(planted(99, 16), cfg, "cpu").plan.kind == "flat"
    assert build_index(planted(100, 16), cfg, "cpu").plan.kind == "ivf"


def test_defaults_are_the_measured_ones():
    cfg = IndexConfig()
    assert (cfg.kind, cfg.auto_threshold, cfg.nprobe, cfg.nlist) == ("auto", AUTO_THRESHOLD, 0, 0)
    assert AUTO_THRESHOLD == 50_000
    plan = plan_index(cfg, 1_000_000, 256)
    assert (plan.kind, plan.nlist, plan.nprobe, plan.train_rows) == ("ivf", 4000, 64, 256_000)
    assert plan_index(IndexConfig(kind="ivfpq"), 10_000, 256).pq_m == 64  # dim / 4 bytes a row
    assert plan_index(None, 10**9, 256).kind == "flat"
    assert plan_index(IndexConfig(kind="ivf"), 0, 256).kind == "flat"  # an emptied pool has no cells to train


@pytest.mark.parametrize(("override", "key"), [
    ("index.kind=hnsw", "index.kind"),
    ("index.nprobe=-1", "index.nprobe"),
    ("index.nlist=-1", "index.nlist"),
    ("index.auto_threshold=0", "index.auto_threshold"),
])
def test_bad_index_config_is_one_line_naming_the_key(tmp_path, override, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"path": str(tmp_path)}]}))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_curate_config(path, [override])
    assert "\n" not in str(err.value)


def test_index_errors_that_need_the_data_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"path": str(tmp_path)}]}))
    with pytest.raises(ConfigError, match=r"index\.nprobe=65 exceeds index\.nlist=64"):
        load_curate_config(path, ["index.nlist=64", "index.nprobe=65"])
    assert load_curate_config(path, ["index.nlist=64", "index.nprobe=64"]).index.nprobe == 64
    for cfg, rows, message in [
        (IndexConfig(kind="ivf", nlist=65, nprobe=8), 64, r"index\.nlist=65 exceeds the 64 rows"),
        (IndexConfig(kind="ivfpq", pq_m=7), 1000, r"index\.pq_m=7 does not divide the embedding dim 32"),
        (IndexConfig(kind="ivfpq"), 255, r"index\.kind=ivfpq needs at least 256 rows"),
        (IndexConfig(kind="ivf", nlist=64, nprobe=8, train_sample=63), 1000, r"index\.train_sample=63"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            plan_index(cfg, rows, 32)
        assert "\n" not in str(err.value)
    assert plan_index(IndexConfig(kind="ivf", nlist=64, nprobe=8), 64, 32).nlist == 64  # a row per cell is enough
    assert plan_index(IndexConfig(kind="ivfpq", pq_m=8), 256, 32).pq_m == 8
    assert plan_index(IndexConfig(kind="ivf", nlist=64, train_sample=64), 1000, 32).train_rows == 64


def test_decontamination_and_retrieval_search_through_the_index_config():
    """Both take the `index:` section: a config that cannot index their database says so, naming the search."""
    from curate.dedup.kernels import contamination_matches
    from curate.selection.retrieve import RetrieveConfig, retrieve

    pool, small = planted(300), planted(20, seed=1)
    too_many_cells = IndexConfig(kind="ivf", nlist=21, nprobe=1)
    with pytest.raises(ConfigError, match="21 exceeds the 20 rows of the decontamination"):
        contamination_matches(pool, small, 0.5, use_gpu="cpu", index_cfg=too_many_cells)
    with pytest.raises(ConfigError, match="301 exceeds the 300 rows of the retrieval"):
        retrieve(pool, small, [str(i) for i in range(20)], cfg=RetrieveConfig(mode="sample", use_gpu="cpu"),
                 index_cfg=IndexConfig(kind="ivf", nlist=301, nprobe=1))
    ivf = retrieve(pool, small, [str(i) for i in range(20)], cfg=RetrieveConfig(mode="sample", use_gpu="cpu"),
                   index_cfg=IndexConfig(kind="ivf", nlist=4, nprobe=4))
    flat = retrieve(pool, small, [str(i) for i in range(20)], cfg=RetrieveConfig(mode="sample", use_gpu="cpu"))
    np.testing.assert_array_equal(ivf[0], flat[0])  # every cell scanned: the exact result


def test_ivf_is_deterministic_across_threads_and_shards(tmp_path):
    x = planted(3000)
    cfg = IndexConfig(kind="ivf", nprobe=4)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = build_index(x, cfg, "cpu").search(x[:500], 8)
        faiss.omp_set_num_threads(2)
        # the same rows added per partition (interleaved shards), the trained cells kept for the other partitions
        shards = [np.arange(p, len(x), 3) for p in range(3)]
        cache = tmp_path / "trained.faiss"
        sharded = build_index(x, cfg, "cpu", shards=shards, cache=cache).search(x[:500], 8)
        assert cache.is_file()
        again = build_index(x, cfg, "cpu", shards=shards, cache=cache).search(x[:500], 8)
    finally:
        faiss.omp_set_num_threads(threads)
    np.testing.assert_array_equal(one[0], sharded[0])
    np.testing.assert_array_equal(sharded[0], again[0])
    np.testing.assert_array_equal(sharded[1], again[1])
    with pytest.raises(ValueError, match="shards hold"):
        build_index(x, cfg, "cpu", shards=shards[:2])


def test_ivf_dedup_gives_the_flat_groups():
    x = planted(3000)
    uids = [f"{i:05d}" for i in np.random.default_rng(1).permutation(len(x))]
    flat = near_duplicates(x, uids, k=16, threshold=0.6, use_gpu="cpu")
    ivf = near_duplicates(x, uids, k=16, threshold=0.6, use_gpu="cpu", index_cfg=IndexConfig(kind="ivf", nprobe=16))
    np.testing.assert_array_equal(flat[0], ivf[0])
    np.testing.assert_array_equal(flat[1], ivf[1])
    # the partition path: each partition searched against an index filled partition by partition
    shards = [np.arange(p, len(x), 2) for p in range(2)]
    parts = [query_partition(x, rows, x[:50], 16, 0.6, rows[:0], "cpu", IndexConfig(kind="ivf", nprobe=16), shards)
             for rows in shards]
    merged = set()
    for p in parts:
        merged |= set(zip(p.edge_i.tolist(), p.edge_j.tolist(), strict=True))
    assert merged == pairs(range_pairs(x, 16, 0.6, use_gpu="cpu"))


def _run_config(tmp_path) -> str:
    pool = tmp_path / "pool"
    pool.mkdir()
    photos = photo_paths("imagenette", per_class=3)
    for p in photos:
        shutil.copy(p, pool / p.name)
    for i in (3, 7):  # re-encoded copies: near duplicates, not byte copies
        Image.open(photos[i]).convert("RGB").save(pool / f"copy{i}.jpg", format="JPEG", quality=60)
    doc = {"name": "ivf", "runs_root": str(tmp_path / "runs"), "partitions": 2, "sources": [{"path": str(pool)}],
           "embed": {"kind": "copydetect", "num_workers": 0},
           "dedup": {"threshold": COPYDETECT_THRESHOLDS[0], "eval_threshold": COPYDETECT_THRESHOLDS[0]},
           "report": {"thumb_size": 32, "max_groups": 2, "images_per_group": 2}}
    path = tmp_path / "ivf.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_index_override_on_the_command_line(tmp_path, capsys):
    from curate.__main__ import main

    cfg_path = _run_config(tmp_path)
    assert main(["run", cfg_path, "index.kind=ivf", "index.nlist=8"]) == 0
    run = RunDir(tmp_path / "runs" / "ivf")
    assert yaml.safe_load((run.root / "config.yaml").read_text())["index"]["kind"] == "ivf"
    summary = run.read_marker("dedup")["summary"]
    assert {k: summary["index"][k] for k in ("kind", "nlist", "nprobe", "rows")} == {
        "kind": "ivf", "nlist": 8, "nprobe": 8, "rows": 32}
    assert summary["near_duplicates"] == 2 and summary["eval_index"] is None
    capsys.readouterr()
    # the same index again: nothing to redo; another nprobe changes what dedup may find: dedup runs again
    assert main(["run", cfg_path, "index.kind=ivf", "index.nlist=8"]) == 0
    assert "dedup     skipped" in capsys.readouterr().out
    assert main(["run", cfg_path, "index.kind=ivf", "index.nlist=8", "index.nprobe=2"]) == 0
    assert "dedup     done" in capsys.readouterr().out
    assert run.read_marker("dedup")["summary"]["index"]["nprobe"] == 2
    # auto at this size is flat, and says why
    assert main(["run", cfg_path]) == 0
    summary = run.read_marker("dedup")["summary"]
    assert summary["index"]["kind"] == "flat" and "auto: 32 rows <" in summary["index"]["reason"]
    assert summary["near_duplicates"] == 2
    assert main(["run", cfg_path, "index.kind=ivf", "index.nlist=33"]) == 2
    assert "index.nlist=33 exceeds the 32 rows of the kNN graph" in capsys.readouterr().err


class RowReader:
    """A float16 database read by rows (as `EmbeddingRows` reads the store): records how many rows each read took and
    refuses to be converted whole."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.shape, self.dtype, self.reads = x, x.shape, x.dtype, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index):
        out = self.x[index]
        self.reads.append(len(out))
        return out

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole database was converted to one array")


def test_a_float16_database_is_stored_as_float16_and_searched_as_its_float32_values(tmp_path):
    x16 = planted(3000).astype(np.float16)
    cfg = IndexConfig(kind="ivf", nprobe=8)
    half = build_index(x16, cfg, "cpu")
    full = build_index(x16.astype(np.float32), cfg, "cpu")
    assert half.plan.fp16 and not full.plan.fp16
    assert isinstance(half.index, faiss.IndexIVFScalarQuantizer) and isinstance(full.index, faiss.IndexIVFFlat)
    (s16, i16), (s32, i32) = half.search(x16[:500], 8), full.search(x16[:500].astype(np.float32), 8)
    np.testing.assert_array_equal(i16, i32)  # lossless: the float16 rows are the float32 index's values
    np.testing.assert_allclose(s16, s32, atol=1e-6)
    # a cache of trained cells of the other kind of index is trained again, not reused
    cache = tmp_path / "trained.faiss"
    build_index(x16.astype(np.float32), cfg, "cpu", cache=cache)
    assert isinstance(build_index(x16, cfg, "cpu", cache=cache).index, faiss.IndexIVFScalarQuantizer)


@pytest.mark.parametrize("cfg", [None, IndexConfig(kind="ivf", nprobe=8),
                                 IndexConfig(kind="ivfpq", nprobe=8, pq_m=8)], ids=["flat", "ivf", "ivfpq"])
def test_the_database_is_read_in_chunks_never_whole(cfg, monkeypatch):
    monkeypatch.setattr("curate.knn.index.ADD_CHUNK", 150)
    monkeypatch.setattr("curate.knn.index.RERANK_CHUNK", 5)
    x16 = planted(1200).astype(np.float16)
    reader = RowReader(x16)
    index = build_index(reader, cfg, "cpu")
    found = range_pairs(reader, 16, 0.6, use_gpu="cpu", chunk_size=300, index=index)
    # IVF trains on one sample (k-means needs it whole; it grows as sqrt(rows)); the rest is read a chunk at a time:
    # 150 rows added at once, 300 queries, ivfpq's re-ranking candidates of 5 queries (5 * 17 * RERANK_FACTOR)
    reads = sorted(reader.reads)
    if index.plan.kind != "flat":
        assert reads.pop() == index.plan.train_rows
    assert reads and max(reads) <= 300 < len(x16) and 5 * 17 * RERANK_FACTOR < 300
    assert pairs(found) == pairs(range_pairs(x16, 16, 0.6, use_gpu="cpu", index_cfg=cfg))


@pytest.mark.parametrize("cfg", [None, IndexConfig(kind="ivf", nprobe=8)], ids=["flat", "ivf"])
def test_a_sharded_index_holds_one_shard_and_finds_what_one_index_finds(cfg, monkeypatch):
    import curate.knn.index as index_module

    monkeypatch.setattr(index_module, "MERGE_CHUNK", 150)  # queries merged in chunks, a short last one

    x = planted(3000)
    shards = [np.arange(p, len(x), 4) for p in range(4)]  # interleaved, as partitions are
    whole = build_index(x, cfg, "cpu")
    one, one_many = whole.search(x[:400], 9), whole.search(x[:3], 1000)
    held = []

    class Recording(index_module.VectorIndex):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            held.append(self.index.ntotal)

    monkeypatch.setattr(index_module, "VectorIndex", Recording)
    sharded = build_index(x, cfg, "cpu", shards=shards)
    assert sharded.whole_batches and sharded.ntotal == len(x)
    found = sharded.search(x[:400], 9)
    assert held == [750] * 4  # one shard in the index at a time
    np.testing.assert_array_equal(found[1], one[1])  # the same cells scanned: the same neighbours
    np.testing.assert_allclose(found[0], one[0], atol=1e-6)
    # a k beyond a shard's rows: the shards' neighbours together, as one index gives them (flat: all 1000)
    many = sharded.search(x[:3], 1000)
    np.testing.assert_allclose(many[0], one_many[0], atol=1e-6)  # equal similarities may come in another order
    assert [set(row) for row in many[1].tolist()] == [set(row) for row in one_many[1].tolist()]
    assert cfg is not None or (many[1] >= 0).all()


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_dedup_queries_on_a_sharded_index_give_the_one_index_graph_and_nearest_neighbours(kind):
    x = planted(2000)
    rows = np.arange(0, 2000, 2)
    shards = [np.arange(0, 2000, 2), np.arange(1, 2000, 2)]
    cfg = IndexConfig(kind=kind, nprobe=8, pq_m=8)
    found = query_partition(x, rows, None, 16, 0.6, rows[::10], "cpu", cfg, shards)
    one_index = pairs(range_pairs(x, 16, 0.6, use_gpu="cpu", query_rows=rows, index_cfg=cfg))
    sharded = pairs((found.edge_i, found.edge_j, found.edge_sim))
    if kind == "ivfpq":  # each shard re-ranks its own candidates: at least the one index's pairs, none invented
        exact = pairs(range_pairs(x, 16, 0.6, use_gpu="cpu", query_rows=rows))
        assert one_index <= sharded <= exact
        return
    assert sharded == one_index
    # the nearest other row, from the same search: what one index of every row finds for the sample
    sims, ids = build_index(x, cfg, "cpu").search(x[rows[::10]], 2)
    np.testing.assert_allclose(found.nn_sim, np.where(ids[:, 0] == rows[::10], sims[:, 1], sims[:, 0]), atol=1e-6)
    with pytest.raises(ValueError, match="nn_rows must be rows of the partition"):
        query_partition(x, rows, None, 16, 0.6, np.array([1]), "cpu", cfg, shards)
