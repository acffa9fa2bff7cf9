"""kNN graph (faiss) and dedup kernels against brute-force numpy references on synthetic embeddings."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest

from curate.config import load_curate_config
from curate.dedup.config import COPYDETECT_THRESHOLDS, DedupConfig
from curate.dedup.kernels import (
    UnionFind,
    components_from_edges,
    contamination_matches,
    decontaminate,
    exact_duplicates,
    near_duplicates,
    near_duplicates_from_edges,
    representatives,
)
from curate.knn.faiss_device import faiss_gpu_status
from curate.knn.graph import gpu_available, knn_search, range_pairs, resolve_use_gpu, unique_edges


def unit(rng: np.random.Generator, n: int, d: int = 32) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def noisy_copy(rng: np.random.Generator, x: np.ndarray, noise: float) -> np.ndarray:
    y = x + noise * rng.standard_normal(x.shape).astype(np.float32)
    return y / np.linalg.norm(y, axis=-1, keepdims=True)


def reference_components(n: int, i, j) -> np.ndarray:
    """Plain Python union-find with path halving, component id = smallest member."""
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i, j, strict=True):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)])


# --- kNN search ------------------------------------------------------------------------------------------------------


def test_knn_search_matches_brute_force():
    rng = np.random.default_rng(0)
    xb, xq = unit(rng, 500), unit(rng, 70)
    sims, ids = knn_search(xb, xq.astype(np.float16), 5, use_gpu="cpu", chunk_size=16)
    full = xq.astype(np.float16).astype(np.float32) @ xb.T
    expected = np.argsort(-full, axis=1)[:, :5]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expected, 1), atol=1e-5)
    assert sims.dtype == np.float32 and ids.dtype == np.int64


def test_knn_search_pads_when_k_exceeds_database():
    rng = np.random.default_rng(1)
    sims, ids = knn_search(unit(rng, 3), unit(rng, 4), 5, use_gpu="cpu")
    assert (ids[:, :3] >= 0).all() and (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()


def test_knn_search_rejects_bad_shapes():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="dim"):
        knn_search(unit(rng, 10, 8), unit(rng, 2, 4), 1, use_gpu="cpu")
    with pytest.raises(ValueError, match="k=0"):
        knn_search(unit(rng, 10), unit(rng, 2), 0)


def test_use_gpu_choices():
    assert resolve_use_gpu("cpu") is False and resolve_use_gpu(False) is False
    assert resolve_use_gpu("auto") == gpu_available()
    with pytest.raises(ValueError, match="use 'auto'"):
        resolve_use_gpu("tpu")
    if not gpu_available():
        with pytest.raises(RuntimeError, match="no GPU"):
            resolve_use_gpu("gpu")


def test_range_pairs_equals_thresholded_brute_force():
    rng = np.random.default_rng(3)
    base = unit(rng, 200)
    x = np.concatenate([base, noisy_copy(rng, base[:40], 0.15), noisy_copy(rng, base[:10], 0.3)])
    i, j, s = range_pairs(x, k=16, threshold=0.6, use_gpu="cpu", chunk_size=50)
    full = x @ x.T
    ei, ej = np.nonzero(np.triu(full >= 0.6, 1))
    # Each image has far fewer than 16 neighbours above 0.6, so the kNN graph holds every such pair.
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == set(zip(ei.tolist(), ej.tolist(), strict=True))
    np.testing.assert_allclose(s, full[i, j], atol=1e-5)
    assert (i < j).all() and len(i) > 40


def test_range_pairs_caps_neighbours_at_k():
    rng = np.random.default_rng(4)
    centre = unit(rng, 1)
    x = noisy_copy(rng, np.repeat(centre, 30, 0), 0.05)  # 30 mutual near-copies
    i, j, _ = range_pairs(x, k=3, threshold=0.5, use_gpu="cpu")
    degree_out = np.zeros(30, int)
    # every query contributes at most k edges, so at most 30 * 3 undirected edges exist
    assert len(i) <= 30 * 3
    np.add.at(degree_out, i, 1)
    np.add.at(degree_out, j, 1)
    assert (degree_out >= 3).all()  # but every row reaches its own k nearest


def test_range_pairs_by_partition_equals_one_call():
    rng = np.random.default_rng(5)
    base = unit(rng, 150)
    x = np.concatenate([base, noisy_copy(rng, base[:50], 0.2)])
    full = range_pairs(x, 8, 0.55, use_gpu="cpu")
    parts = [range_pairs(x, 8, 0.55, use_gpu="cpu", query_rows=np.arange(p, len(x), 4)) for p in range(4)]
    merged = unique_edges(*(np.concatenate([p[c] for p in parts]) for c in range(3)))
    for a, b in zip(full, merged, strict=True):
        np.testing.assert_array_equal(a, b)


def test_unique_edges_keeps_each_pair_once():
    i, j, s = unique_edges(np.array([3, 1, 2, 1]), np.array([1, 3, 0, 3]), np.array([0.7, 0.9, 0.8, 0.6]))
    assert i.tolist() == [0, 1] and j.tolist() == [2, 3]
    np.testing.assert_allclose(s, [0.8, 0.9])


def test_without_faiss_the_gpu_is_unavailable_with_the_reason(monkeypatch):
    """The GPU machine of bench/gpu_check.sh has no faiss: the status says why instead of raising."""
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    faiss_gpu_status.cache_clear()
    try:
        ok, reason = faiss_gpu_status()
    finally:
        faiss_gpu_status.cache_clear()
    assert not ok and reason.startswith("faiss does not import")


@pytest.mark.gpu
def test_gpu_search_matches_cpu():
    if not gpu_available():
        pytest.skip(f"faiss on GPU is not available: {faiss_gpu_status()[1]}")
    rng = np.random.default_rng(6)
    xb, xq = unit(rng, 2000, 64), unit(rng, 300, 64)
    cpu = knn_search(xb, xq, 10, use_gpu="cpu")
    gpu = knn_search(xb, xq, 10, use_gpu="gpu")
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-4)
    assert (gpu[1] == cpu[1]).mean() > 0.99  # ties may order differently
    assert range_pairs(xb, 10, 0.3, use_gpu="gpu")[0].shape == range_pairs(xb, 10, 0.3, use_gpu="cpu")[0].shape


# --- union-find and keep rule ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_edges", [0, 50, 400, 3000])
def test_union_find_matches_reference(n_edges):
    rng = np.random.default_rng(n_edges)
    n = 1000
    i, j = rng.integers(0, n, n_edges), rng.integers(0, n, n_edges)
    np.testing.assert_array_equal(components_from_edges(n, i, j), reference_components(n, i, j))


def test_union_find_long_chain_and_batches():
    n = 5000
    uf = UnionFind(n)
    order = np.random.default_rng(0).permutation(n - 1)
    for part in np.array_split(order, 7):  # a path graph added in shuffled batches
        uf.union(part, part + 1)
    assert (uf.components() == 0).all()
    assert uf.find(n - 1) == 0 and len(uf) == n


def test_keep_rule_smallest_uid_independent_of_row_order():
    uids = ["d", "b", "e", "a", "c", "f"]
    group = np.array([0, 0, 1, 0, 1, 2])
    dup = representatives(group, uids)
    assert dup.tolist() == [3, 3, 4, -1, -1, -1]  # 'a' keeps group 0, 'c' keeps group 1, 'f' alone
    perm = np.random.default_rng(0).permutation(6)
    dup_perm = representatives(group[perm], [uids[p] for p in perm])
    survivor = {uids[p]: (uids[perm[d]] if d >= 0 else None) for p, d in zip(perm, dup_perm, strict=True)}
    assert survivor == {u: (uids[d] if d >= 0 else None) for u, d in zip(uids, dup, strict=True)}
    assert representatives(group, uids, keep="first_row").tolist() == [-1, 0, -1, 0, 2, -1]
    with pytest.raises(ValueError, match="keep"):
        representatives(group, uids, keep="largest")


def test_exact_duplicates_by_sha256():
    sha = ["x", "y", "x", "z", "y", "x"]
    uids = ["u5", "u1", "u0", "u3", "u4", "u2"]
    dup = exact_duplicates(sha, uids)
    assert dup.tolist() == [2, -1, -1, -1, 1, 2]
    assert exact_duplicates([], []).shape == (0,)
    with pytest.raises(ValueError, match="digests"):
        exact_duplicates(["x"], ["a", "b"])
    # Arrow columns, as the dedup step passes them (no Python string per row), give the same answer
    assert exact_duplicates(pa.chunked_array([sha[:2], sha[2:]]), pa.array(uids)).tolist() == dup.tolist()


def test_keep_rule_orders_uids_as_python_does():
    uids = ["b", "a\u00e9", "a", "Z", "a\U0001f600", "\u00e9"]  # code points beyond ASCII and beyond the BMP
    group = np.zeros(len(uids), dtype=np.int64)
    assert representatives(group, pa.array(uids)).tolist() == representatives(group, uids).tolist()
    assert uids[int(np.nonzero(representatives(group, uids) < 0)[0][0])] == min(uids)


# --- near duplicates and decontamination ---------------------------------------------------------------------------


def test_near_duplicates_finds_planted_copies_and_chains():
    rng = np.random.default_rng(7)
    base = unit(rng, 300, 128)  # unrelated rows: cosine ~N(0, 0.09), far below 0.6
    copies = noisy_copy(rng, base[:30], 0.07)  # cosine ~0.78 with their originals
    x = np.concatenate([base, copies])
    uids = [f"img{r:04d}" for r in range(300)] + [f"copy{r:04d}" for r in range(30)]
    dup, comp = near_duplicates(x, uids, k=8, threshold=0.6, use_gpu="cpu")
    for c in range(30):
        assert comp[300 + c] == comp[c] == c  # component id = smallest row
        assert dup[c] == 300 + c and dup[300 + c] == -1  # 'copy...' < 'img...': the copy's uid survives
    assert (dup[30:300] == -1).all()
    # A ~ B and B ~ C join A and C even when A and C are below the threshold.
    a = unit(rng, 1, 64)[0]
    b = noisy_copy(rng, a, 0.07)
    c = noisy_copy(rng, b, 0.07)
    x3 = np.stack([a, b, c])
    dup3, comp3 = near_duplicates(x3, ["a", "b", "c"], k=2, threshold=float(min(a @ b, b @ c)) - 1e-3,
                                  use_gpu="cpu")
    assert comp3.tolist() == [0, 0, 0] and dup3.tolist() == [-1, 0, 0]


def test_near_duplicates_from_edges_matches_one_call():
    rng = np.random.default_rng(8)
    base = unit(rng, 100)
    x = np.concatenate([base, noisy_copy(rng, base[:30], 0.1)])
    uids = [f"u{r:03d}" for r in range(len(x))]
    i, j, _ = range_pairs(x, 8, 0.3, use_gpu="cpu")
    a = near_duplicates(x, uids, 8, 0.3, use_gpu="cpu")
    b = near_duplicates_from_edges(len(x), i, j, uids)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_decontamination_removes_whole_components():
    rng = np.random.default_rng(9)
    evals = unit(rng, 5, 64)
    pool = unit(rng, 50, 64)
    pool[10] = noisy_copy(rng, evals[2], 0.05)  # a direct copy of eval image 2
    pool[11] = noisy_copy(rng, pool[10], 0.05)  # a copy of that copy, further from the eval image
    pool[12] = noisy_copy(rng, pool[11], 0.05)
    _, comp = near_duplicates(pool, [f"p{r:02d}" for r in range(50)], k=4, threshold=0.8, use_gpu="cpu")
    assert comp[10] == comp[11] == comp[12]
    eval_uids = [f"eval{e}" for e in range(5)]
    threshold = float(pool[10] @ evals[2]) - 1e-3
    assert float(pool[12] @ evals[2]) < threshold  # only the direct copy is close enough on its own
    matched = decontaminate(pool, evals, eval_uids, threshold, comp, use_gpu="cpu")
    assert [r for r, m in enumerate(matched) if m] == [10, 11, 12]
    assert matched[10] == matched[11] == matched[12] == "eval2"
    alone = decontaminate(pool, evals, eval_uids, threshold, None, use_gpu="cpu")
    assert [r for r, m in enumerate(alone) if m] == [10]
    index, sim = contamination_matches(pool, evals, threshold, comp, use_gpu="cpu")
    assert index[11] == 2 and sim[11] == pytest.approx(float((evals @ pool[11]).max()), abs=1e-5)
    assert index[0] == -1 and sim[0] == pytest.approx(float((evals @ pool[0]).max()), abs=1e-5)


def test_unset_thresholds_are_those_of_the_embedding_dedup_runs_on(tmp_path):
    """Unrelated photos sit near cosine 0.6 under copydetect: DINOv2's 0.6 / 0.45 are only the networks' default."""
    path = tmp_path / "c.yaml"
    path.write_text("sources: [{path: pool}]\nembed: {kind: copydetect}\n")  # no dedup section
    cfg = load_curate_config(path)
    assert (cfg.dedup.threshold, cfg.dedup.eval_threshold) == COPYDETECT_THRESHOLDS == (0.8, 0.75)
    assert load_curate_config(path, ["embed.kind=random_vit"]).dedup.threshold == 0.6
    networks = load_curate_config(path, ["embed.kind=random_vit", "dedup.eval_threshold=0.5"]).dedup
    assert (networks.threshold, networks.eval_threshold) == (0.6, 0.5)  # a set value stays
    # dedup runs on dedup_embed when there is one
    split = load_curate_config(path, ["embed.kind=random_vit", "dedup_embed={kind: copydetect}"]).dedup
    assert (split.threshold, split.eval_threshold) == (0.8, 0.75)


def test_uncalibrated_threshold_warning_names_only_the_low_one(caplog):
    from curate.steps.dedup import _warn_uncalibrated_thresholds

    cfg = load_curate_config(None, ["sources=[{path: pool}]", "dedup.threshold=0.6", "dedup.eval_threshold=0.8"])
    _warn_uncalibrated_thresholds(cfg)
    assert "dedup.threshold=0.6 is below the copydetect embedding's calibrated 0.8" in caplog.text
    assert "eval_threshold" not in caplog.text.split("unrelated photos")[0]
    caplog.clear()
    _warn_uncalibrated_thresholds(load_curate_config(None, ["sources=[{path: pool}]"]))
    assert caplog.text == ""


def test_decontamination_without_evals_or_pool():
    rng = np.random.default_rng(10)
    assert decontaminate(unit(rng, 4), np.zeros((0, 32), np.float32), [], 0.45) == [None] * 4
    assert decontaminate(np.zeros((0, 32), np.float32), unit(rng, 2), ["a", "b"], 0.45) == []


def test_dedup_config_defaults_and_validation():
    cfg = DedupConfig()
    assert (cfg.k, cfg.threshold, cfg.eval_threshold, cfg.keep) == (64, None, None, "first_uid")  # the embedding's
    with pytest.raises(ValueError, match="dedup.keep"):
        DedupConfig(keep="biggest")
    with pytest.raises(ValueError, match="dedup.threshold"):
        DedupConfig(threshold=1.5)
    with pytest.raises(ValueError, match="dedup.k"):
        DedupConfig(k=0)
    with pytest.raises(ValueError, match="at most 2048"):
        DedupConfig(k=2048)
    assert DedupConfig(k=2047).k == 2047
