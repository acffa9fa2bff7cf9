"""Sinkhorn-Knopp teacher targets (SwAV / DINOv2 centering), computed in log space so it cannot overflow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.losses.collectives import global_logsumexp


def _normalise_columns_(log_q: Tensor) -> Tensor:
    """log_q minus each column's log-sum-exp over the global batch, in place (every prototype gets the same total
    mass). Every rank must call it when torch.distributed is initialised.

    Not F.log_softmax(dim=0): on CUDA a softmax over the first of two dimensions runs one thread per column looping
    over the rows, while logsumexp's reductions over dim 0 are the efficient column reductions of any sum.
    """
    return log_q.sub_(global_logsumexp(log_q, dim=0))


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
    Here every step is a log-softmax in fp32, so logits of any finite magnitude give finite targets, and the
    result equals the exp-based algorithm wherever the latter does not overflow. The marginals' constants 1/K and
    1/B are left out: scaling the whole matrix by a constant is undone by the next normalisation, and the last one
    (rows, times B) leaves rows summing to 1 whatever they were. So the reference's first step (dividing by the
    total) and its row count are not needed, each row normalisation is one log-softmax, and the last one with the
    final exp is one softmax. On a [5000, 65536] fp32 matrix (a ViT-S/14 step's masked patches) that is about 12
    passes over the matrix per iteration instead of 20 (tests/test_step_speed_sinkhorn.py holds the former formula).

    When torch.distributed is initialised, the per-prototype sums are reduced over all processes (so every rank
    must call this, possibly with zero rows) and the result on each rank equals its rows of the single-process
    result on the concatenated batch; ranks may hold different numbers of rows.

    Args:
        logits: [B, K] teacher head outputs for this process; any float dtype (upcast to fp32), no gradient.
        teacher_temp: sharpening temperature (> 0).
        n_iterations: Sinkhorn iterations (>= 1, so that rows sum to 1 exactly).
        n_samples: the global number of rows B (DINOv2's argument, e.g. the all-reduced count of masked patches for
            iBOT); checked to be positive when it is a number. The result does not depend on it (see above).
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

    # A copy in fp32 even for fp32 input: the in-place division must not touch the caller's logits.
    log_q = logits.detach().to(torch.float32, copy=True).div_(teacher_temp)
    for _ in range(n_iterations - 1):
        log_q = F.log_softmax(_normalise_columns_(log_q), dim=1)
    return F.softmax(_normalise_columns_(log_q), dim=1)
