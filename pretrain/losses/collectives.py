"""The collectives the losses need beyond `pretrain.distributed`'s, as no-ops when torch.distributed is not
initialised: one code path serves a single CPU process, torchrun and Slurm jobs (default process group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pretrain.distributed import all_reduce_sum as all_reduce_sum_
from pretrain.distributed import is_distributed

__all__ = ["all_reduce_max_", "all_reduce_sum_", "global_logsumexp", "is_distributed"]


def all_reduce_max_(tensor: Tensor) -> Tensor:
    """Element-wise maximum of `tensor` in place over all processes; returns it for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


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
    total = all_reduce_sum_(torch.exp(local - shift))
    return shift + torch.log(total)
