"""Sample- and cluster-based retrieval against direct numpy computations."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from curate.selection.retrieve import RetrieveConfig, resolve_mode, retrieve


def unit(rng: np.random.Generator, n: int, d: int = 24) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sample_mode_takes_n_nearest_per_seed():
    rng = np.random.default_rng(0)
    pool, seeds = unit(rng, 400), unit(rng, 15)
    uids = [f"s{i}" for i in range(15)]
    mask, reasons, score = retrieve(pool, seeds, uids, cfg=RetrieveConfig(mode="sample", n_per_seed=5, use_gpu="cpu"))
    sims = seeds @ pool.T
    top = np.argsort(-sims, axis=1)[:, :5]
    np.testing.assert_array_equal(np.nonzero(mask)[0], np.unique(top))
    for r in np.nonzero(mask)[0]:
        brought_by = [s for s in range(15) if r in top[s]]
        best = max(brought_by, key=lambda s: sims[s, r])
        assert reasons[r] == f"seed:{uids[best]}"
        assert score[r] == pytest.approx(sims[best, r], abs=1e-5)
    assert all(reasons[r] is None for r in np.nonzero(~mask)[0]) and np.isnan(score[~mask]).all()


@pytest.mark.parametrize("chunk", [65536, 7], ids=["one chunk", "chunks of 7 rows"])
def test_cluster_mode_takes_top_m_of_clusters_with_enough_seeds(chunk, monkeypatch):
    monkeypatch.setattr("curate.selection.retrieve.CHUNK_ROWS", chunk)  # the pool is read a chunk at a time
    rng = np.random.default_rng(1)
    pool, seeds = unit(rng, 300), unit(rng, 20)
    pool_assign = rng.integers(0, 6, 300)
    seed_assign = np.array([0] * 6 + [1] * 4 + [2] * 3 + [3] * 7)  # t=3: clusters 0, 1 and 3 qualify
    cfg = RetrieveConfig(mode="cluster", m_per_cluster=10, min_seeds_per_cluster=3, cluster_level=2, use_gpu="cpu")
    mask, reasons, score = retrieve(pool, seeds, [f"s{i}" for i in range(20)], pool_assign, seed_assign, cfg)
    expected = []
    for c in (0, 1, 3):
        mean = seeds[seed_assign == c].sum(0)
        mean /= np.linalg.norm(mean)
        members = np.nonzero(pool_assign == c)[0]
        sims = pool[members] @ mean
        chosen = members[np.argsort(-sims)[:10]]
        expected.extend(chosen.tolist())
        for r in chosen:
            assert reasons[r] == f"cluster:2/{c}" and score[r] == pytest.approx(float(pool[r] @ mean), abs=1e-5)
    assert sorted(expected) == np.nonzero(mask)[0].tolist()


def test_cap_keeps_the_highest_scores():
    rng = np.random.default_rng(2)
    pool, seeds = unit(rng, 200), unit(rng, 10)
    full = retrieve(pool, seeds, [str(i) for i in range(10)], cfg=RetrieveConfig(mode="sample", n_per_seed=8,
                                                                                   use_gpu="cpu"))
    capped = retrieve(pool, seeds, [str(i) for i in range(10)], cfg=RetrieveConfig(mode="sample", n_per_seed=8,
                                                                                     cap_per_seed_set=25,
                                                                                     use_gpu="cpu"))
    assert capped[0].sum() == 25 and full[0].sum() > 25
    kept = np.nonzero(capped[0])[0]
    assert set(kept) <= set(np.nonzero(full[0])[0])
    assert full[2][kept].min() >= np.sort(full[2][full[0]])[::-1][24] - 1e-6


def test_auto_mode_by_seed_set_size(caplog):
    cfg = RetrieveConfig(mode="auto", auto_threshold=100)
    assert resolve_mode(cfg, 100, have_clusters=True) == "sample"
    assert resolve_mode(cfg, 99, have_clusters=True) == "cluster"
    with caplog.at_level(logging.WARNING, logger="curate.selection.retrieve"):
        assert resolve_mode(cfg, 99, have_clusters=False) == "sample"
    assert "no cluster assignments" in caplog.text
    with pytest.raises(ValueError, match="run the cluster step"):
        resolve_mode(RetrieveConfig(mode="cluster"), 5, have_clusters=False)


def test_empty_inputs_and_bad_config():
    rng = np.random.default_rng(3)
    mask, reasons, score = retrieve(unit(rng, 5), np.zeros((0, 24), np.float32), [])
    assert not mask.any() and reasons == [None] * 5 and np.isnan(score).all()
    with pytest.raises(ValueError, match="seed uids"):
        retrieve(unit(rng, 5), unit(rng, 2), ["only-one"])
    with pytest.raises(ValueError, match="retrieve.mode"):
        RetrieveConfig(mode="nearest")
    with pytest.raises(ValueError, match="n_per_seed"):
        RetrieveConfig(n_per_seed=0)
