"""Sinkhorn-Knopp teacher targets (SwAV / DINOv2 centering), computed in log space so it cannot overflow."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dinoforge.collectives import all_reduce_sum
from pretrain.losses.collectives import global_logsumexp


@torch.no_grad()
def sinkhorn_knopp(
    logits: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples: int | Tensor | None = None,
) -> Tensor:
    """Balanced soft assignments of samples to prototypes: [B, K] teacher logits -> [B, K] fp32 targets.

    The matrix exp(logits / teacher_temp) is alternately scaled so that every prototype receives total mass 1/K
    (summed over the global batch) and every sample mass 1/B; the result is multiplied by B so that each row is a
    distribution over the K prototypes (rows sum to 1).

    The reference exponentiates first and overflows as soon as logits / temp > 88 (a logit of 3.5 at temp 0.04).
    Here every step is a log-sum-exp in fp32, so logits of any finite magnitude give finite targets, and the
    result equals the exp-based algorithm wherever the latter does not overflow. The reference's first step
    (dividing by the total sum) is a constant shift in log space that the next normalisation removes, so it is
    skipped.

    When torch.distributed is initialised, the per-prototype sums are reduced over all processes (so every rank
    must call this, possibly with zero rows) and the result on each rank equals its rows of the single-process
    result on the concatenated batch; ranks may hold different numbers of rows.

    Args:
        logits: [B, K] teacher head outputs for this process; any float dtype (upcast to fp32), no gradient.
        teacher_temp: sharpening temperature (> 0).
        n_iterations: Sinkhorn iterations (>= 1, so that rows sum to 1 exactly).
        n_samples: the global number of rows B, if already known (e.g. the all-reduced count of masked patches for
            iBOT); must be the same on every rank. None counts the rows with an all-reduce. With n_iterations >= 1
            the final row normalisation makes the output independent of B up to rounding; B only sets the
            intermediate marginals, as in the paper, so passing it merely saves one scalar all-reduce.
    """
    if logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects [batch, prototypes] logits, got shape {tuple(logits.shape)}")
    if not teacher_temp > 0:
        raise ValueError(f"sinkhorn_knopp: teacher_temp must be > 0, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(
            f"sinkhorn_knopp: n_iterations must be >= 1 (rows only sum to 1 after one), got {n_iterations}"
        )
    if isinstance(n_samples, (int, float)) and n_samples <= 0:
        raise ValueError(f"sinkhorn_knopp: n_samples must be a positive global row count, got {n_samples}")

    log_q = logits.detach().float() / teacher_temp
    n_prototypes = log_q.shape[1]
    if n_samples is None:
        count = all_reduce_sum(torch.tensor(float(log_q.shape[0]), device=log_q.device))
    else:
        count = torch.as_tensor(n_samples, device=log_q.device).float()
    log_b = torch.log(count)
    log_k = math.log(n_prototypes)

    for _ in range(n_iterations):
        # Each prototype (column) gets total mass 1/K over the global batch.
        log_q -= global_logsumexp(log_q, dim=0)
        log_q -= log_k
        # Each sample (row) gets mass 1/B; rows are local, so no communication.
        log_q -= torch.logsumexp(log_q, dim=1, keepdim=True)
        log_q -= log_b
    log_q += log_b
    return log_q.exp_()
