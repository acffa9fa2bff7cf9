"""Multi-head self-attention over packed token groups, with a run-time choice of kernel.

Backends:
- `xformers`: one `memory_efficient_attention` call over all groups with a block-diagonal mask (CUDA only).
- `sdpa`: PyTorch `scaled_dot_product_attention`, one call per group (any device).
`auto` takes xformers for CUDA tensors when it imports, SDPA otherwise. The choice is made per call, from the
`DINOFORGE_ATTENTION` environment variable when set, else from the module's `backend` attribute, so that the same
weights run everywhere and no import-time switch is frozen (a reported pain of the reference).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.packing import TokenLayout

BACKENDS = ("auto", "sdpa", "xformers")
BACKEND_ENV = "DINOFORGE_ATTENTION"


@functools.cache
def xformers_ops():
    """The `xformers.ops` module, or None when xformers is not installed or broken for this torch."""
    try:
        import xformers.ops as xops
    except Exception:  # a mismatched xformers build raises more than ImportError
        return None
    return xops


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that will actually run for tensors on `device`."""
    backend = os.environ.get(BACKEND_ENV) or requested
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (from {BACKEND_ENV} or config); "
                         f"choose from {BACKENDS}")
    if backend == "auto":
        return "xformers" if device.type == "cuda" and xformers_ops() is not None else "sdpa"
    if backend == "xformers" and (device.type != "cuda" or xformers_ops() is None):
        raise RuntimeError(
            f"attention backend 'xformers' needs CUDA tensors and an importable xformers (device {device}, "
            f"xformers {'present' if xformers_ops() else 'missing'}); use 'sdpa' or 'auto'"
        )
    return backend


@functools.lru_cache(maxsize=64)
def _block_diagonal_mask(seqlens: tuple[int, ...]):
    return xformers_ops().fmha.BlockDiagonalMask.from_seqlens(list(seqlens))


def packed_attention(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, backend: str) -> Tensor:
    """Attention of [T, H, d] queries/keys/values within each sequence of `layout`; returns [T, H, d]."""
    if backend == "xformers":
        bias = _block_diagonal_mask(tuple(layout.seqlens))
        out = xformers_ops().memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)
        return out[0]
    outs = []
    for qg, kg, vg in zip(layout.unpack(q), layout.unpack(k), layout.unpack(v), strict=True):
        # [B, N, H, d] -> [B, H, N, d] for SDPA
        og = F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2))
        outs.append(og.transpose(1, 2).reshape(-1, *q.shape[1:]))
    return torch.cat(outs, dim=0)


class Attention(nn.Module):
    """Self-attention with a fused `qkv` projection (DINOv2 key names: `qkv`, `proj`)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """x: [T, D] packed tokens -> [T, D]."""
        t, d = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.num_heads, d // self.num_heads).unbind(1)
        out = packed_attention(q, k, v, layout, resolve_backend(self.backend, x.device))
        return self.proj(out.reshape(t, d))
