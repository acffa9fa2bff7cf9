"""Stochastic depth (Huang et al. 2016) for residual branches over packed tokens.

Two forms with the same expectation:
- `mask`: compute the branch for every sample, zero it for dropped samples, rescale the kept ones by 1/(1-p).
- `efficient` (DINOv2): compute the branch only on the kept samples and add it back scaled by B/kept, which saves
  the FLOPs of the dropped samples (about p of the block's cost).

Neither form synchronises host and device: every index is drawn or built on the device, and the per-token factors
are expanded from per-sample ones group by group (each group's sequences share one length).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dinoforge.models.packing import TokenLayout

Branch = Callable[[Tensor, TokenLayout], Tensor]


def _per_token(per_sample: list[Tensor], layout: TokenLayout) -> Tensor:
    """[T, 1] factors of the tokens of `layout` from one [b] factor tensor per group."""
    return torch.cat([s.view(-1, 1).expand(-1, n).reshape(-1) for s, (_, n) in zip(per_sample, layout.groups,
                                                                                     strict=True)])[:, None]


def add_residual_efficient(x: Tensor, layout: TokenLayout, branch: Branch, drop_prob: float) -> Tensor:
    """x + branch(x) on a random subset of ceil((1-p)*B) samples per group, scaled by B/kept."""
    keep, scales = [], []
    for b, _ in layout.groups:
        kept = max(int(b * (1 - drop_prob)), 1)
        keep.append(torch.randperm(b, device=x.device)[:kept])
        scales.append(torch.full((kept,), b / kept, device=x.device, dtype=x.dtype))
    sub_layout, index = layout.sample_subset(keep)
    residual = branch(x[index], sub_layout)
    # index_add_ takes one dtype. With LayerScale in the activation dtype the branch matches the stream (bf16 under
    # autocast) and nothing is converted; a branch that still differs is promoted as `x + residual` would be.
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype).index_add(0, index, (residual * _per_token(scales, sub_layout)).to(dtype))


def add_residual_masked(x: Tensor, layout: TokenLayout, branch: Branch, drop_prob: float) -> Tensor:
    """x + branch(x) * per-sample Bernoulli(1-p) / (1-p)."""
    keep = x.new_empty(len(layout.seqlens)).bernoulli_(1 - drop_prob) / (1 - drop_prob)
    # Not keep[layout.token_sample_ids(device)]: that builds its index with torch.tensor(seqlens, device=...), a
    # blocking host-to-device copy in every block of every step.
    return x + branch(x, layout) * _per_token(list(keep.split([b for b, _ in layout.groups])), layout)
