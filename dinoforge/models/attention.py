"""Multi-head self-attention over packed token groups, with a run-time choice of kernel.

Backends:
- `xformers`: one `memory_efficient_attention` call over all groups with a block-diagonal mask (CUDA only).
- `sdpa`: PyTorch `scaled_dot_product_attention`, one call per group (any device; flash / cuDNN on GPU).
`auto` takes xformers only where a one-time probe (a tiny forward and backward with a `BlockDiagonalMask` on the
target device and dtype) ran: xformers wheels are built for one torch/CUDA pair and often import without their
kernels, and then fail at the first forward. The choice is made per call, from the `DINOFORGE_ATTENTION`
environment variable when set, else from the module's `backend` attribute, so that the same weights run everywhere
and no import-time switch is frozen (a reported pain of the reference). Each distinct choice is logged once.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoforge.models.ffn import scaled_linear
from dinoforge.models.packing import TokenLayout

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers")
BACKEND_ENV = "DINOFORGE_ATTENTION"


@functools.cache
def xformers_ops():
    """The `xformers.ops` module, or the reason it cannot be imported (a string)."""
    try:
        import xformers.ops as xops
    except Exception as e:  # a mismatched xformers build raises more than ImportError
        return f"xformers does not import: {type(e).__name__}: {e}"
    return xops


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


@functools.cache
def xformers_status(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether xformers' block-diagonal attention runs on `device` in `dtype`, and why (xformers' own words)."""
    if device.type != "cuda":
        return False, f"xformers runs on CUDA only (device {device})"
    xops = xformers_ops()
    if isinstance(xops, str):
        return False, xops
    return probe_xformers(xops, device, dtype)


def probe_xformers(xops, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """A tiny forward and backward of `xops.memory_efficient_attention` with a block-diagonal mask."""
    try:
        q = torch.randn(1, 8, 2, 16, device=device, dtype=dtype, requires_grad=True)
        bias = xops.fmha.BlockDiagonalMask.from_seqlens([3, 5])
        xops.memory_efficient_attention(q, q, q, attn_bias=bias).float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # NotImplementedError "No operator found ...", CUDA errors, missing symbols
        return False, f"xformers probe failed on {device} {dtype}: {_first_line(e)}"
    return True, f"xformers forward+backward probe ran on {device} {dtype}"


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend that runs for `dtype` tensors on `device`, why): `DINOFORGE_ATTENTION` when set, else `requested`."""
    return _decide(os.environ.get(BACKEND_ENV) or None, requested, device, dtype)


@functools.cache
def _decide(from_env: str | None, requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """Cached per choice, so that each one is probed and logged once per process."""
    backend = from_env or requested
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (from {BACKEND_ENV if from_env else 'the config'}); "
                         f"choose from {BACKENDS}")
    works, why = xformers_status(device, dtype) if backend != "sdpa" else (False, "")
    if backend == "xformers" and not works:
        raise RuntimeError(f"attention backend 'xformers' cannot run: {why}. Use 'sdpa' or 'auto' (model."
                           f"attn_backend or {BACKEND_ENV}), or install an xformers built for torch "
                           f"{torch.__version__}.")
    if backend == "auto":
        backend, why = ("xformers", why) if works else ("sdpa", f"PyTorch SDPA; not xformers: {why}")
    elif backend == "sdpa":
        why = "PyTorch SDPA, as requested"
    asked = f"{BACKEND_ENV}={from_env}, overriding {requested!r}" if from_env else repr(requested)
    if device.type != "meta":  # FLOP counting runs on meta stand-ins: nothing to tell the user
        logger.info("attention on %s %s: %s (asked %s): %s", device, str(dtype).removeprefix("torch."), backend,
                    asked, why)
    return backend, why


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that will actually run for `dtype` tensors on `device`."""
    return choose_backend(requested, device, dtype)[0]


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

    def forward(self, x: Tensor, layout: TokenLayout, out_scale: Tensor | None = None) -> Tensor:
        """x: [T, D] packed tokens -> [T, D]; `out_scale` [D] multiplies the output (see scaled_linear)."""
        t, d = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.num_heads, d // self.num_heads).unbind(1)
        out = packed_attention(q, k, v, layout, resolve_backend(self.backend, x.device, q.dtype))
        return scaled_linear(self.proj, out.reshape(t, d), out_scale)
