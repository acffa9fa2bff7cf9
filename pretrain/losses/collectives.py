"""A logsumexp over a dimension split across processes (Sinkhorn-Knopp's prototypes or samples), exact and finite;
the identity's counterpart for a single process."""

from __future__ import annotations

import torch
from torch import Tensor

from dinoforge.collectives import all_reduce_max_, all_reduce_sum
from dinoforge.launch import is_distributed


def global_logsumexp(values: Tensor, dim: int) -> Tensor:
    """log(sum(exp(values))) along `dim`, where `dim` is split across processes (each holds a slice of it).

    The global maximum is subtracted before exponentiating, so values in the thousands stay finite. A process
    whose slice is empty contributes -inf (nothing), which the maximum and the sum both absorb.
    """
    if values.shape[dim] == 0:
        local = values.new_full(values.sum(dim).shape, float("-inf"))
    else:
        local = torch.logsumexp(values, dim=dim)
    if not is_distributed():
        return local
    shift = all_reduce_max_(local.clone())
    # Where every process is empty the shift is -inf; use 0 there so the result stays -inf instead of NaN.
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = all_reduce_sum(torch.exp(local - shift))
    return shift + torch.log(total)
