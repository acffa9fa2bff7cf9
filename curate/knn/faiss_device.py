"""Where faiss runs: on the GPU only after a real smoke test passed in this process, otherwise on the CPU.

A faiss GPU wheel can import, count the GPUs (`faiss.get_num_gpus() > 0`) and still fail at the first kernel: built
for a CUDA the driver cannot run, or without kernels for this GPU's architecture. So the GPU path is proved by
running it, once per process: an exact flat inner-product search and a small spherical k-means on every visible GPU,
each compared with faiss on the CPU (`gpu_smoke`).

faiss checks CUDA calls with `FAISS_ASSERT`, which aborts the process instead of raising, so the first contact runs
in a child process: a crash there becomes a reason to stay on the CPU instead of killing a curation step. The child
also imports torch when this process has (the faiss-gpu wheel brings CUDA 12 libraries, torch may bring CUDA 13
ones: both load side by side). Once the child passed, the same smoke runs in this process (milliseconds): it checks
the faiss that will actually be called, next to whatever this process already did with the GPU.
"""

from __future__ import annotations

import functools
import importlib
import logging
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)
# faiss is imported in the functions that call it: curation's config imports this module, and ingest runs without it.

NO_GPU_SUPPORT = "faiss has no GPU support (a CPU-only build)"
NO_GPU = "faiss sees no GPU"
SMOKE_TIMEOUT_S = 300  # the first run on a GPU newer than the wheel may JIT-compile faiss's kernels from PTX
_REASON_CHARS = 500


class FaissGpuSmokeError(RuntimeError):
    """The faiss GPU smoke test failed; the message is the reason, in the words of the library where it raised."""


def to_all_gpus(cpu_index: faiss.Index, shard: bool = True) -> faiss.Index:
    """`cpu_index` copied onto all visible GPUs; `shard`: each GPU holds a slice of the database (memory scales with
    the number of GPUs), else each holds a full replica."""
    import faiss
    options = faiss.GpuMultipleClonerOptions()
    options.shard = shard
    return faiss.index_cpu_to_all_gpus(cpu_index, co=options)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def _exception_text(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def _check_flat_search(rng: np.random.Generator, n_gpus: int) -> None:
    import faiss
    d, k = 32, 8
    xb = _unit(rng.standard_normal((512, d)))
    xq = _unit(xb[:64] + 0.05 * rng.standard_normal((64, d)))  # each query's nearest row is the one it was made from
    cpu = faiss.IndexFlatIP(d)
    cpu.add(xb)
    ref_sims, ref_ids = cpu.search(xq, k)
    gpu = to_all_gpus(faiss.IndexFlatIP(d))
    gpu.add(xb)
    sims, ids = gpu.search(xq, k)
    sims, ids = np.asarray(sims), np.asarray(ids)
    if sims.shape != ref_sims.shape or ids.shape != ref_ids.shape:
        raise FaissGpuSmokeError(f"faiss flat-index search on {n_gpus} GPU(s) returned shapes {sims.shape}, "
                                 f"{ids.shape}; expected {ref_sims.shape}")
    # Similarities, not ids, are compared beyond the first column: ties may come back in another order. The
    # tolerance admits a GEMM in reduced precision (TF32: ~1e-4 here), not a broken kernel.
    wrong = ~np.isclose(sims, ref_sims, rtol=0, atol=1e-3).all(axis=1) | (ids[:, 0] != ref_ids[:, 0])
    if wrong.any():
        raise FaissGpuSmokeError(f"faiss flat-index search on {n_gpus} GPU(s) disagrees with faiss on CPU for "
                                 f"{int(wrong.sum())} of {len(xq)} queries")


def _check_kmeans(rng: np.random.Generator, n_gpus: int) -> None:
    import faiss
    d, k = 32, 4
    centres = _unit(rng.standard_normal((k, d)))
    x = _unit(np.repeat(centres, 64, axis=0) + 0.1 * rng.standard_normal((64 * k, d)))
    params = dict(niter=10, seed=1, spherical=True, min_points_per_centroid=1, verbose=False)
    # The same call as `curate.selection.cluster.spherical_kmeans`; with the same seed both devices start from the
    # same sample.
    gpu = faiss.Kmeans(d, k, gpu=True, **params)
    gpu.train(x)
    cpu = faiss.Kmeans(d, k, gpu=False, **params)
    cpu.train(x)
    c = np.asarray(gpu.centroids, dtype=np.float32)
    if c.shape != (k, d) or not np.isfinite(c).all():
        raise FaissGpuSmokeError(f"faiss k-means on {n_gpus} GPU(s) returned centroids of shape {c.shape} "
                                 f"(finite: {bool(np.isfinite(c).all())}); expected finite [{k}, {d}]")
    match = (_unit(c) @ _unit(cpu.centroids).T).max(axis=1)
    if (match < 0.99).any():
        raise FaissGpuSmokeError(f"faiss k-means on {n_gpus} GPU(s) disagrees with faiss on CPU: its centroids' "
                                 f"best cosine to the CPU centroids is {float(match.min()):.3f} (< 0.99)")


def gpu_smoke() -> str:
    """Run faiss on every visible GPU: a flat inner-product search and a small spherical k-means, each compared with
    faiss on the CPU. Returns a one-line summary; raises `FaissGpuSmokeError` with the reason when one fails."""
    import faiss
    if not hasattr(faiss, "StandardGpuResources"):
        raise FaissGpuSmokeError(NO_GPU_SUPPORT)
    try:
        n_gpus = faiss.get_num_gpus()
    except Exception as e:
        raise FaissGpuSmokeError(f"faiss.get_num_gpus() failed: {_exception_text(e)}") from e
    if n_gpus < 1:
        raise FaissGpuSmokeError(NO_GPU)
    rng = np.random.default_rng(0)
    for what, check in (("flat-index search", _check_flat_search), ("k-means", _check_kmeans)):
        try:
            check(rng, n_gpus)
        except FaissGpuSmokeError:
            raise
        except Exception as e:  # whatever faiss raises is the reason
            raise FaissGpuSmokeError(f"faiss {what} on {n_gpus} GPU(s) failed: {_exception_text(e)}") from e
    return f"faiss {faiss.__version__} on {n_gpus} GPU(s): flat-index search and k-means agree with the CPU"


def _smoke_in_child(script: str = __file__, timeout_s: float = SMOKE_TIMEOUT_S) -> str | None:
    """Run `script` (this module's `__main__`: the smoke) in a child process: None when it passed, else the reason."""
    # `-c` and runpy rather than `python script`: the script's folder (curate/) must not come first on sys.path.
    run = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
    cmd = [sys.executable, "-c", run, script, *(["torch"] if "torch" in sys.modules else [])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"the faiss GPU smoke test did not finish within {timeout_s:g} s"
    except OSError as e:
        return f"the faiss GPU smoke test could not start a child process: {_exception_text(e)}"
    if done.returncode == 0:
        return None
    said = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode == 1 and said:
        return said[-1]  # a `FaissGpuSmokeError`, printed by the child
    how = f"exited with status {done.returncode}"
    if done.returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-done.returncode).name}"
        except ValueError:
            how = f"was killed by signal {-done.returncode}"
    stderr = " | ".join(line.strip() for line in done.stderr.splitlines()[-3:] if line.strip())
    if len(stderr) > _REASON_CHARS:
        stderr = "..." + stderr[-_REASON_CHARS:]
    return f"the faiss GPU smoke test's process {how}: {stderr or 'nothing on stderr'}"


@functools.cache
def faiss_gpu_status() -> tuple[bool, str]:
    """(ok, reason), computed once per process: ok when faiss on GPU passed `gpu_smoke`, in a child process and then
    in this one. `reason` says what ran, or why not, in the library's words where it raised."""
    try:
        import faiss
    except ImportError as e:  # e.g. a GPU machine given only the checkout: curation says so when it needs faiss
        return False, f"faiss does not import: {e}"
    if not hasattr(faiss, "StandardGpuResources"):
        return False, NO_GPU_SUPPORT
    failed = _smoke_in_child()
    if failed is None:
        try:
            return True, gpu_smoke()
        except FaissGpuSmokeError as e:
            failed = str(e)
    if failed in (NO_GPU_SUPPORT, NO_GPU):
        torch_gpus = _torch_gpu_count()
        if torch_gpus:
            failed += f" (torch sees {torch_gpus} CUDA device(s): this faiss build cannot use them)"
    return False, failed


def _torch_gpu_count() -> int:
    # Only to say that a GPU is there after all, and only from a torch already imported (importing it takes seconds):
    # the curation steps import it. torch counts devices with NVML and creates no CUDA context.
    torch = sys.modules.get("torch")
    try:
        return torch.cuda.device_count() if torch is not None else 0
    except Exception:  # a hint for a log line must not fail the fallback
        return 0


def gpu_available() -> bool:
    """True when faiss on GPU passed its smoke test in this process."""
    return faiss_gpu_status()[0]


@functools.cache
def _log_cpu_fallback(reason: str) -> None:
    # A warning when a GPU is there but faiss cannot use it; on a machine without one, CPU is simply the device.
    level = logging.INFO if reason in (NO_GPU_SUPPORT, NO_GPU) else logging.WARNING
    log.log(level, "faiss runs on CPU: %s", reason)


def resolve_use_gpu(use_gpu: bool | str) -> bool:
    """Whether faiss runs on the GPU. `"auto"`: when the smoke test passed, else CPU with the reason logged once;
    `True`/`"gpu"`/`"cuda"`: GPU, an error saying why when the smoke test failed; `False`/`"cpu"`: CPU."""
    if isinstance(use_gpu, str):
        choice = use_gpu.lower()
        if choice == "auto":
            ok, reason = faiss_gpu_status()
            if not ok:
                _log_cpu_fallback(reason)
            return ok
        if choice in ("gpu", "cuda", "true"):
            use_gpu = True
        elif choice in ("cpu", "false"):
            use_gpu = False
        else:
            raise ValueError(f"use_gpu={use_gpu!r}: use 'auto', 'gpu' or 'cpu'")
    if use_gpu:
        ok, reason = faiss_gpu_status()
        if not ok:
            raise RuntimeError(f"faiss on GPU was requested (use_gpu='gpu') but cannot run here: {reason}. Use "
                               "use_gpu='auto' (GPU when it works, else CPU) or 'cpu', or install a faiss GPU build "
                               "that matches this machine's CUDA driver and GPU")
    return bool(use_gpu)


if __name__ == "__main__":
    import faiss

    # The child of `_smoke_in_child`: exit 0 when the smoke passed, else the reason on stdout and exit 1. The
    # arguments after this script name modules the parent has loaded (torch); they are imported before the GPU work,
    # and only when there is a GPU: a machine without one does not pay seconds for them.
    try:
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            for module in sys.argv[2:]:
                importlib.import_module(module)
        print(gpu_smoke())
    except FaissGpuSmokeError as e:
        print(e)
        sys.exit(1)
