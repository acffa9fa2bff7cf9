"""faiss on GPU only after a real smoke test: a fake faiss GPU build that fails it sends curation to the CPU."""

from __future__ import annotations

import logging
import sys

import faiss
import numpy as np
import pytest
import torch

from curate.knn import faiss_device
from curate.knn.faiss_device import NO_GPU, NO_GPU_SUPPORT, faiss_gpu_status, resolve_use_gpu
from curate.knn.graph import knn_search, range_pairs
from curate.knn.index import build_index
from curate.selection.cluster import spherical_kmeans

CUDA_ERROR = ("Error in void faiss::gpu::runL2Norm(...) at faiss/gpu/impl/L2Norm.cu:264: "
              "CUDA error 209 no kernel image is available for execution on the device")


@pytest.fixture(autouse=True)
def fresh_status():
    """The status and its log line are cached per process: each test computes its own, and leaves none behind."""
    faiss_gpu_status.cache_clear()
    faiss_device._log_cpu_fallback.cache_clear()
    yield
    faiss_gpu_status.cache_clear()
    faiss_device._log_cpu_fallback.cache_clear()


class ClonerOptions:
    shard = False


class RaisingGpuIndex:
    """Takes vectors like a GPU index, then fails its search the way a wheel without kernels for this GPU does."""

    def __init__(self, cpu_index):
        self.cpu = cpu_index

    def add(self, x):
        self.cpu.add(x)

    def search(self, x, k):
        raise RuntimeError(CUDA_ERROR)


class WrongGpuIndex(RaisingGpuIndex):
    def search(self, x, k):
        sims, ids = self.cpu.search(x, k)
        return sims[:, ::-1].copy(), ids[:, ::-1].copy()  # worst neighbours first


class PythonGpuIndex(RaisingGpuIndex):
    """Right search results, but no faiss C++ index: faiss k-means cannot train with it."""

    def search(self, x, k):
        return self.cpu.search(x, k)


def fake_gpu(monkeypatch, make_index) -> list:
    """faiss built with GPU support, seeing one GPU, whose GPU indexes are `make_index(cpu_index)`; returns the list
    of CPU indexes sent to the (fake) GPU."""
    sent = []

    def index_cpu_to_all_gpus(index, co=None, ngpu=-1):
        sent.append(index)
        return make_index(index)

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", ClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss.extra_wrappers, "get_num_gpus", lambda: 1)  # where faiss.Kmeans(gpu=True) looks
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", index_cpu_to_all_gpus)
    # The child process would run the real faiss, which cannot see the fake: let it pass, so the smoke in this
    # process meets the fake.
    monkeypatch.setattr(faiss_device, "_smoke_in_child", lambda: None)
    return sent


def unit(rng, n, d=32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_auto_runs_on_cpu_with_the_reason_logged_once_when_gpu_search_fails(monkeypatch, caplog):
    fake_gpu(monkeypatch, RaisingGpuIndex)
    with caplog.at_level(logging.INFO, logger="curate.knn.faiss_device"):
        assert resolve_use_gpu("auto") is False
        assert resolve_use_gpu("auto") is False
        assert build_index(unit(np.random.default_rng(0), 10), None, "auto").on_gpu is False
    ok, reason = faiss_gpu_status()
    assert not ok and reason.startswith("faiss flat-index search on 1 GPU(s) failed: RuntimeError: ")
    assert "no kernel image is available" in reason
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage() == f"faiss runs on CPU: {reason}"


def test_explicit_gpu_raises_with_the_reason_and_what_to_do(monkeypatch):
    fake_gpu(monkeypatch, RaisingGpuIndex)
    with pytest.raises(RuntimeError, match="no kernel image is available") as err:
        resolve_use_gpu("gpu")
    assert "use_gpu='auto'" in str(err.value) and "'cpu'" in str(err.value)
    with pytest.raises(RuntimeError, match="no kernel image"):
        knn_search(unit(np.random.default_rng(0), 10), unit(np.random.default_rng(1), 2), 3, use_gpu=True)
    assert resolve_use_gpu("cpu") is False  # an explicit CPU choice runs no smoke at all


def test_wrong_gpu_search_results_are_caught(monkeypatch):
    fake_gpu(monkeypatch, WrongGpuIndex)
    ok, reason = faiss_gpu_status()
    assert not ok and reason == "faiss flat-index search on 1 GPU(s) disagrees with faiss on CPU for 64 of 64 queries"
    assert resolve_use_gpu("auto") is False


def test_failing_gpu_kmeans_is_caught(monkeypatch):
    fake_gpu(monkeypatch, PythonGpuIndex)
    ok, reason = faiss_gpu_status()
    assert not ok and reason.startswith("faiss k-means on 1 GPU(s) failed: ")


def test_a_failing_gpu_count_is_caught(monkeypatch):
    fake_gpu(monkeypatch, RaisingGpuIndex)

    def get_num_gpus():
        raise RuntimeError("CUDA error 35 CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(faiss, "get_num_gpus", get_num_gpus)
    assert faiss_gpu_status() == (False, "faiss.get_num_gpus() failed: RuntimeError: CUDA error 35 CUDA driver "
                                         "version is insufficient for CUDA runtime version")


def test_curation_search_and_kmeans_are_right_on_cpu_under_a_failing_gpu(monkeypatch):
    rng = np.random.default_rng(2)
    xb, xq = unit(rng, 300), unit(rng, 40)
    centres = unit(rng, 4)
    blobs = np.repeat(centres, 50, axis=0) + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    blobs /= np.linalg.norm(blobs, axis=1, keepdims=True)
    cpu_knn = knn_search(xb, xq, 5, use_gpu="cpu")
    cpu_pairs = range_pairs(xb, 8, 0.3, use_gpu="cpu")
    cpu_km = spherical_kmeans(blobs, 4, seed=0, use_gpu="cpu")

    sent = fake_gpu(monkeypatch, RaisingGpuIndex)
    sims, ids = knn_search(xb, xq, 5, use_gpu="auto")
    pairs = range_pairs(xb, 8, 0.3, use_gpu="auto")
    centroids, assign = spherical_kmeans(blobs, 4, seed=0, use_gpu="auto")

    assert len(sent) == 1  # the smoke's index only: nothing of the curation went to the broken GPU
    brute = xq @ xb.T
    np.testing.assert_array_equal(ids[:, 0], brute.argmax(axis=1))
    np.testing.assert_allclose(sims, np.sort(brute, axis=1)[:, ::-1][:, :5], atol=1e-5)
    np.testing.assert_array_equal(ids, cpu_knn[1])
    for a, b in zip(pairs, cpu_pairs, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(centroids, cpu_km[0])
    np.testing.assert_array_equal(assign, cpu_km[1])
    assert len(np.unique(assign)) == 4 and (np.bincount(assign) == 50).all()  # one cluster per blob


def test_a_gpu_that_passes_the_smoke_is_used(monkeypatch):
    sent = fake_gpu(monkeypatch, lambda cpu_index: cpu_index)  # a "GPU" index that is the exact CPU one
    ok, reason = faiss_gpu_status()
    assert ok and reason.endswith("on 1 GPU(s): flat-index search and k-means agree with the CPU")
    assert resolve_use_gpu("auto") is True and resolve_use_gpu("gpu") is True
    index = build_index(unit(np.random.default_rng(3), 20), None, "auto")
    assert index.on_gpu and index.index is sent[-1]


def test_faiss_without_gpu_support_runs_on_cpu_without_a_warning(monkeypatch, caplog):
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    monkeypatch.setattr(faiss_device, "_smoke_in_child", lambda: pytest.fail("no child for a CPU-only faiss"))
    with caplog.at_level(logging.INFO, logger="curate.knn.faiss_device"):
        assert resolve_use_gpu("auto") is False
    assert faiss_gpu_status() == (False, NO_GPU_SUPPORT)
    [record] = caplog.records
    assert record.levelno == logging.INFO and NO_GPU_SUPPORT in record.getMessage()
    with pytest.raises(RuntimeError, match="no GPU support"):
        resolve_use_gpu("cuda")


def test_a_crash_or_hang_of_the_child_becomes_the_reason(tmp_path):
    crash = tmp_path / "crash.py"
    # What faiss does on a CUDA error: FAISS_ASSERT prints and aborts, no Python exception.
    crash.write_text("import os, sys\nprint(\"Faiss assertion 'err__ == cudaSuccess' failed; details: CUDA error 209 "
                     "no kernel image is available\", file=sys.stderr, flush=True)\nos.abort()\n")
    reason = faiss_device._smoke_in_child(str(crash))
    assert reason.startswith("the faiss GPU smoke test's process was killed by SIGABRT: Faiss assertion")
    assert "CUDA error 209" in reason
    failed = tmp_path / "failed.py"
    failed.write_text("import sys\nprint('faiss k-means on 1 GPU(s) failed: out of memory')\nsys.exit(1)\n")
    assert faiss_device._smoke_in_child(str(failed)) == "faiss k-means on 1 GPU(s) failed: out of memory"
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(30)\n")
    assert faiss_device._smoke_in_child(str(hang), timeout_s=0.5) == \
        "the faiss GPU smoke test did not finish within 0.5 s"


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="a machine with a GPU: see the gpu-marked test")
def test_child_smoke_on_a_machine_without_gpu():
    assert faiss_device._smoke_in_child() in (NO_GPU, NO_GPU_SUPPORT)
    assert faiss_gpu_status()[0] is False


@pytest.mark.gpu
def test_faiss_gpu_smoke_passes_and_gpu_agrees_with_cpu():
    if torch.cuda.device_count() == 0:
        pytest.skip("no CUDA device")
    ok, reason = faiss_gpu_status()
    print(f"faiss GPU status: ok={ok}: {reason}", file=sys.stderr)
    assert ok, reason
    rng = np.random.default_rng(4)
    xb, xq = unit(rng, 5000, 64), unit(rng, 500, 64)
    gpu = knn_search(xb, xq, 16, use_gpu="auto")
    cpu = knn_search(xb, xq, 16, use_gpu="cpu")
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-4)
    assert (gpu[1] == cpu[1]).mean() > 0.99  # ties may come back in another order
    centres = unit(rng, 8, 64)
    x = np.repeat(centres, 100, axis=0) + 0.05 * rng.standard_normal((800, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c_gpu, a_gpu = spherical_kmeans(x, 8, seed=0, use_gpu="gpu")
    c_cpu, a_cpu = spherical_kmeans(x, 8, seed=0, use_gpu="cpu")
    assert np.isfinite(c_gpu).all()
    assert ((c_gpu @ c_cpu.T).max(axis=1) > 0.99).all()
    assert (np.bincount(a_gpu, minlength=8) == np.bincount(a_cpu, minlength=8)).all()
