"""Stratified held-out part of a train split, for choosing hyperparameters without touching the reported split."""

from __future__ import annotations

import torch
from torch import Tensor


def stratified_holdout(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit indices, holdout indices): about `fraction` of every class with at least 2 samples goes to the holdout.

    A class with one sample stays in the fit part, so that every class can be learned.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    fit, holdout = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_out = min(max(round(fraction * len(idx)), 1), len(idx) - 1) if len(idx) >= 2 else 0
        holdout.append(idx[:n_out])
        fit.append(idx[n_out:])
    fit_idx, holdout_idx = torch.cat(fit).sort().values, torch.cat(holdout).sort().values
    if len(holdout_idx) == 0:
        raise ValueError(
            f"the holdout of {len(labels)} train samples is empty (every class has a single sample); "
            "hyperparameters cannot be chosen without using the val split — provide more train samples"
        )
    return fit_idx, holdout_idx
