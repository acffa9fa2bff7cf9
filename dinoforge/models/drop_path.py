"""Stochastic depth (Huang et al. 2016) for residual branches over packed tokens.

Two forms with the same expectation:
- `mask`: compute the branch for every sample, zero it for dropped samples, rescale the kept ones by 1/(1-p).
- `efficient` (DINOv2): compute the branch only on the kept samples and add it back scaled by B/kept, which saves
  the FLOPs of the dropped samples (about p of the block's cost).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dinoforge.models.packing import TokenLayout

Branch = Callable[[Tensor, TokenLayout], Tensor]


def add_residual_efficient(x: Tensor, layout: TokenLayout, branch: Branch, drop_prob: float) -> Tensor:
    """x + branch(x) on a random subset of ceil((1-p)*B) samples per group, scaled by B/kept."""
    keep, scales = [], []
    for b, _ in layout.groups:
        kept = max(int(b * (1 - drop_prob)), 1)
        keep.append(torch.randperm(b, device=x.device)[:kept])
        scales.append(torch.full((kept,), b / kept, device=x.device, dtype=x.dtype))
    sub_layout, index = layout.sample_subset(keep)
    residual = branch(x[index], sub_layout)
    token_scale = torch.cat([s.repeat_interleave(n) for s, (_, n) in zip(scales, sub_layout.groups, strict=True)])
    # Under autocast the branch and the stream can differ in dtype (bf16 matmuls, fp32 LayerScale): promote as
    # `x + residual` does in the masked form, since index_add_ takes one dtype.
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype).index_add(0, index, (residual * token_scale[:, None]).to(dtype))


def add_residual_masked(x: Tensor, layout: TokenLayout, branch: Branch, drop_prob: float) -> Tensor:
    """x + branch(x) * per-sample Bernoulli(1-p) / (1-p)."""
    n_samples = len(layout.seqlens)
    keep = x.new_empty(n_samples).bernoulli_(1 - drop_prob) / (1 - drop_prob)
    return x + branch(x, layout) * keep[layout.token_sample_ids(x.device)][:, None]
