"""EMA centering of teacher logits (DINO): a running mean of teacher outputs subtracted before the softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dinoforge.collectives import all_reduce_sum


@torch.no_grad()
def softmax_centered(logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """softmax((logits - center) / teacher_temp) over the last dim, in fp32, without gradient.

    `center` holds K values in any shape (DINOv2 stores [1, K] or [1, 1, K]); it is applied to every row of
    `logits` [..., K].
    """
    if not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    n_prototypes = logits.shape[-1]
    if center.numel() != n_prototypes:
        raise ValueError(
            f"teacher logits have {n_prototypes} prototypes but the center has {center.numel()}: "
            "the loss was built with a different out_dim than the head"
        )
    # One subtraction that reads the (bf16) logits and writes the fp32 difference, then an in-place division: the
    # same arithmetic as (logits.float() - center) / temp with one pass and one [rows, K] matrix fewer.
    shifted = torch.sub(logits.detach(), center.detach().float().reshape(n_prototypes))
    return F.softmax(shifted.div_(teacher_temp), dim=-1)


@torch.no_grad()
def ema_update_center_(center: Tensor, logits: Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * mean of all rows of `logits` [..., K] over all processes.

    The sum and the row count are all-reduced together, so ranks with different numbers of rows (or none) give
    the mean of the concatenated batch. When there is no row anywhere the center is left unchanged.
    """
    n_prototypes = center.numel()
    if logits.shape[-1] != n_prototypes:
        raise ValueError(
            f"teacher logits have {logits.shape[-1]} prototypes but the center has {n_prototypes}: "
            "the loss was built with a different out_dim than the head"
        )
    rows = logits.detach().float().reshape(-1, n_prototypes)
    # One collective for sum and count: [sum over rows (K values), number of rows].
    # (new_full, not new_tensor: building it from a Python list is a blocking host-to-device copy on a GPU)
    stats = torch.cat([rows.sum(dim=0), rows.new_full((1,), rows.shape[0])])
    all_reduce_sum(stats)
    count = stats[-1]
    batch_mean = stats[:-1] / count.clamp(min=1.0)
    updated = center.float().reshape(n_prototypes) * momentum + batch_mean * (1.0 - momentum)
    # torch.where rather than `if count > 0` avoids a device-to-host sync every step.
    center.copy_(torch.where(count > 0, updated, center.float().reshape(n_prototypes)).reshape(center.shape))
