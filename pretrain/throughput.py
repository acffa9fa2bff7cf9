"""Images/s and model FLOPs utilisation (MFU) of the training step."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

# Dense peak TFLOP/s from the vendors' data sheets (no sparsity), by device-name fragment and dtype.
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 494.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 378.0},  # before "H100": the first fragment found in the name wins
    "H100": {"bf16": 989.0, "fp32": 494.0},  # SXM; fp32 means TF32 tensor cores
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp32": 183.0},
    "V100": {"bf16": 125.0, "fp32": 15.7},
}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                        seconds: float = 1.0) -> float:
    """FLOP/s of the fastest of repeated square matmuls on `device` over about `seconds`: the practical peak that
    MFU is measured against on CPU (the fastest call is the one least disturbed by other load). On the 2-core
    development machine 1024 read ~13% below 2048."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_name(device: torch.device) -> str:
    """What a run ran on, for its metrics and model card: the GPU's name, or the CPU and its torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def datasheet_peak(device: torch.device, precision: str = "fp32") -> float | None:
    """The data-sheet peak FLOP/s of a known GPU, else None."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return peaks["bf16" if precision == "bf16" else "fp32"] * 1e12
    return None


class Throughput:
    """Per-step timing: images/s, data-loading time and MFU from a known FLOP count per step.

    With a `measure` callable (a device without a data sheet, e.g. a CPU), the peak is re-measured at the first
    `measurements` reports and the fastest rate seen is kept: one measurement taken while data workers start can read
    far below the true peak (a CPU run once logged MFU 1.5). Measuring stops after that because each measurement
    costs about a second of matmuls (3-4% of a 2-core cpu_tiny run logging every 20 steps, by py-spy). An MFU
    still above 1 is reported as NaN with a warning, never as a figure.
    """

    def __init__(self, flops_per_step: float, peak: float, world_size: int = 1,
                 measure: Callable[[], float] | None = None, measurements: int = 3) -> None:
        self.flops_per_step, self.peak, self.world_size, self.measure = flops_per_step, peak, world_size, measure
        self._measurements_left = measurements if measure is not None else 0
        self._warned = False

    def stats(self, images: int, step_seconds: float, data_seconds: float) -> dict[str, float]:
        """`images` and `flops_per_step` are per process; MFU is per device."""
        if self._measurements_left > 0:
            self._measurements_left -= 1
            self.peak = max(self.peak, self.measure())
        mfu = self.flops_per_step / step_seconds / self.peak if self.peak else float("nan")
        if mfu > 1:
            if not self._warned:
                logger.warning("MFU %.2f > 1: the measured peak (%.1f GFLOP/s) is unreliable on this busy machine; "
                               "MFU is logged as NaN. Set peak_tflops to the device's peak.", mfu, self.peak / 1e9)
                self._warned = True
            mfu = float("nan")
        return {
            "images_per_s": images * self.world_size / step_seconds,
            "data_time_s": data_seconds,
            "step_time_s": step_seconds,
            "mfu": mfu,
        }


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
