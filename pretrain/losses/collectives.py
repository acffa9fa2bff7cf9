"""The few collectives the losses need, as no-ops when torch.distributed is not initialised.

Losses call these directly (rather than through a process-group wrapper) so that one code path serves a single
CPU process, torchrun, and Slurm jobs: the reductions always run over the default process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group exists (collectives must then be called by every rank)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` in place over all processes; returns it for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


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
