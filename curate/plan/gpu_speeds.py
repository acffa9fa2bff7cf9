"""Stated GPU speeds for `python -m curate plan`: vendor datasheet peaks (SXM parts, dense, no sparsity) and the
fraction of each peak the plan assumes a curation kernel reaches. None of these is measured here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpeed:
    name: str
    memory_gb: float
    fp32_tflops: float  # CUDA-core fp32 peak: faiss flat search and k-means (cuBLAS sgemm)
    bf16_tflops: float  # tensor-core bf16 dense peak: the embedding network (curate embeds under bf16 autocast)
    bandwidth_tbs: float  # HBM bandwidth: scanning IVF lists is memory-bound
    note: str = ""


GPUS = {
    "v100": GpuSpeed("V100-SXM2-32GB", 32, 15.7, 15.7, 0.9,
                     "no bf16 tensor cores (125 TFLOPs are fp16 only): bf16 autocast is taken at the fp32 rate"),
    "a100": GpuSpeed("A100-SXM4-80GB", 80, 19.5, 312, 2.039),
    "h100": GpuSpeed("H100-SXM5-80GB", 80, 67, 989, 3.35),
    "h200": GpuSpeed("H200-SXM-141GB", 141, 67, 989, 4.8),
}

# Achievable fractions of the peaks (assumptions, stated in the plan's output): ViT inference at large batch reaches
# 30-50% of the tensor-core peak; large sgemm reaches ~70% of the fp32 peak; a list scan ~50% of HBM bandwidth.
NETWORK_EFFICIENCY = 0.4
SGEMM_EFFICIENCY = 0.7
SCAN_EFFICIENCY = 0.5


def gpu_speed(kind: str) -> GpuSpeed:
    """The stated speeds of GPU `kind` (v100, a100, h100, h200); ValueError naming the known kinds."""
    key = kind.lower().replace("-", "").replace("_", "")
    if key not in GPUS:
        raise ValueError(f"unknown GPU kind {kind!r}: use one of {', '.join(GPUS)} (--gpu-kind)")
    return GPUS[key]
