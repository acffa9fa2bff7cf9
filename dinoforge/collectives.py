"""Collectives over the default process group, each a no-op (or the identity) for a single process, so that one code
path serves a laptop, torchrun and Slurm; and the even split of a dataset over processes.

Splitting: process r takes samples r, r + W, r + 2W, ... (W = world size): every sample exactly once, none padded or
repeated, unlike `DistributedSampler`, which pads with duplicates when the size is not divisible by W.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from dinoforge.launch import is_distributed


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` in place over all processes (no-op for a single process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Average a floating-point `tensor` in place over all processes (no-op for a single process); returns it."""
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got {tensor.dtype}; use all_reduce_sum "
                        "for counts")
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def barrier() -> None:
    """Wait for every process (no-op for a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_max_(tensor: Tensor) -> Tensor:
    """Element-wise maximum of `tensor` in place over all processes; returns it for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def current_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_indices(n_total: int, rank: int, world_size: int) -> list[int]:
    """The dataset indices this process handles."""
    return list(range(rank, n_total, world_size))


def gather_in_dataset_order(local: Tensor, n_total: int) -> Tensor:
    """Rows computed by every process for its `rank_indices` -> [n_total, ...] in dataset order, on every rank.

    Tensors travel on the process group's device (CUDA for NCCL) and come back on `local`'s device.
    """
    world, me = current_world_size(), current_rank()
    expected = len(rank_indices(n_total, me, world))
    if len(local) != expected:
        raise RuntimeError(f"rank {me} computed {len(local)} rows but owns {expected} of {n_total} samples")
    if world == 1:
        return local
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
        torch.device("cpu")
    per_rank = math.ceil(n_total / world)
    padded = local.new_zeros((per_rank, *local.shape[1:]), device=comm_device)
    padded[: len(local)] = local.to(comm_device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = local.new_empty((n_total, *local.shape[1:]))
    for r, part in enumerate(parts):
        out[r::world] = part[: len(rank_indices(n_total, r, world))].to(out.device)
    return out


def sum_over_ranks(value: int) -> int:
    """An integer count summed over all processes (the count itself when not distributed)."""
    if current_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
        torch.device("cpu")
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total.item())
