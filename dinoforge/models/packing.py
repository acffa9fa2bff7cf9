"""Sequence packing: several crop batches of different token counts as one flat token tensor.

Blocks see `x` as [T, D] (all tokens of all crops concatenated) and a `TokenLayout` that says how the T tokens
split into groups of (batch, seq_len). Dense layers (norms, projections, MLP) then run as one large matmul over
every crop size at once; only attention needs the layout, to keep sequences from attending to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenLayout:
    """Groups of `batch` sequences of `seq_len` tokens each, stored one after the other."""

    groups: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, tensors: list[Tensor]) -> TokenLayout:
        """The layout of a list of [B_i, N_i, D] tensors."""
        return cls(tuple((int(t.shape[0]), int(t.shape[1])) for t in tensors))

    @property
    def num_tokens(self) -> int:
        return sum(b * n for b, n in self.groups)

    @cached_property
    def seqlens(self) -> list[int]:
        """Length of every sequence in order (the block-diagonal structure of attention)."""
        return [n for b, n in self.groups for _ in range(b)]

    def pack(self, tensors: list[Tensor]) -> Tensor:
        """[B_i, N_i, D] tensors -> [T, D]."""
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors], dim=0)

    def unpack(self, x: Tensor) -> list[Tensor]:
        """[T, ...] -> list of [B_i, N_i, ...] tensors."""
        parts = x.split([b * n for b, n in self.groups], dim=0)
        return [p.view(b, n, *x.shape[1:]) for p, (b, n) in zip(parts, self.groups, strict=True)]

    def sample_subset(self, keep: list[Tensor]) -> tuple[TokenLayout, Tensor]:
        """Layout and token indices of the samples `keep[g]` (sample indices within group g)."""
        index, groups, offset = [], [], 0
        for (b, n), kept in zip(self.groups, keep, strict=True):
            tokens = offset + kept.view(-1, 1) * n + torch.arange(n, device=kept.device).view(1, -1)
            index.append(tokens.reshape(-1))
            groups.append((int(kept.numel()), n))
            offset += b * n
        return TokenLayout(tuple(groups)), torch.cat(index)

    def token_sample_ids(self, device: torch.device | None = None) -> Tensor:
        """[T] index of the sequence (over all groups) that each token belongs to."""
        lengths = torch.tensor(self.seqlens, device=device)
        return torch.repeat_interleave(torch.arange(len(self.seqlens), device=device), lengths)
