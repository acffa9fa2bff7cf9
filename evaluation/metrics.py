"""Top-k accuracy, in percent."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: % of rows whose label is among the k highest scores}; k is capped at the number of classes."""
    if scores.ndim != 2 or len(scores) != len(labels):
        raise ValueError(f"scores must be [N, C] with N = len(labels), got {tuple(scores.shape)} and {len(labels)}")
    if len(labels) == 0:
        raise ValueError("no samples to measure accuracy on")
    labels = labels.to(scores.device)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: 100.0 * hits[:, :k].any(dim=1).double().mean().item() for k in ks}
