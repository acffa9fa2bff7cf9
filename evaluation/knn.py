"""Weighted k-nearest-neighbour classification on frozen features (the DINO / DINOv2 protocol).

Neighbours are the k train samples of highest cosine similarity. Each votes for its label with weight
softmax(sim / T) over the k neighbours. DINO weights votes by exp(sim / T); DINOv2 (`dinov2/eval/knn.py`,
`KnnModule.forward`) takes a softmax over its largest k and sums the first k: both are exp(sim / T) up to a
positive factor per test sample, so they rank classes identically to the softmax used here (which subtracts
the largest similarity first and cannot overflow at T = 0.07).

The train set is streamed to the device in chunks with a running top-k, so it may be larger than device memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.metrics import topk_accuracy

logger = logging.getLogger(__name__)


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    train_chunk_size: int = 65536,
    test_chunk_size: int = 4096,
) -> Tensor:
    """Predicted label of every test sample -> LongTensor [N_test] (on CPU)."""
    scores = knn_scores(train_features, train_labels, test_features, [k], temperature, num_classes, device,
                        train_chunk_size, test_chunk_size)[k]
    return scores.argmax(dim=1)


def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: Sequence[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    train_chunk_size: int = 65536,
    test_chunk_size: int = 4096,
) -> dict[int, Tensor]:
    """{k: class scores [N_test, C]} (vote weights summed per class, on CPU) for every k in `ks`."""
    _check_inputs(train_features, train_labels, test_features, ks, temperature)
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    sims, indices = nearest_neighbours(train_features, test_features, max(ks), device, train_chunk_size,
                                       test_chunk_size)
    neighbour_labels = train_labels.cpu()[indices]
    return {k: vote(sims[:, :k], neighbour_labels[:, :k], temperature, num_classes) for k in ks}


def nearest_neighbours(
    train_features: Tensor,
    test_features: Tensor,
    k: int,
    device: torch.device | str | None = None,
    train_chunk_size: int = 65536,
    test_chunk_size: int = 4096,
) -> tuple[Tensor, Tensor]:
    """Cosine similarities [N_test, k] (descending) and train indices [N_test, k] of the k nearest train samples."""
    device = torch.device(device) if device is not None else test_features.device
    # The test set stays on the device; each train chunk visits it once.
    test = F.normalize(test_features.to(device, torch.float32), dim=1)
    best_sims = torch.full((len(test), 0), float("-inf"), device=device)
    best_idx = torch.zeros((len(test), 0), dtype=torch.long, device=device)
    for start in range(0, len(train_features), train_chunk_size):
        chunk = F.normalize(train_features[start : start + train_chunk_size].to(device, torch.float32), dim=1)
        new_sims, new_idx = [], []
        for t in range(0, len(test), test_chunk_size):
            sims = test[t : t + test_chunk_size] @ chunk.T
            top_sims, top_idx = sims.topk(min(k, len(chunk)), dim=1)
            merged_sims = torch.cat([best_sims[t : t + test_chunk_size], top_sims], dim=1)
            merged_idx = torch.cat([best_idx[t : t + test_chunk_size], top_idx + start], dim=1)
            keep_sims, keep_pos = merged_sims.topk(min(k, merged_sims.shape[1]), dim=1)
            new_sims.append(keep_sims)
            new_idx.append(merged_idx.gather(1, keep_pos))
        best_sims, best_idx = torch.cat(new_sims), torch.cat(new_idx)
    return best_sims.cpu(), best_idx.cpu()


def vote(neighbour_sims: Tensor, neighbour_labels: Tensor, temperature: float, num_classes: int) -> Tensor:
    """Class scores [N, C]: softmax(sim / T) over each row's neighbours, summed per label."""
    weights = torch.softmax(neighbour_sims.float() / temperature, dim=1)
    scores = torch.zeros(len(weights), num_classes, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)


def knn_evaluate(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    n_per_class: Sequence[int] = (),
    n_tries: int = 1,
    seed: int = 0,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    train_chunk_size: int = 65536,
    test_chunk_size: int = 4096,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) for every k, on the full train set and on few-shot subsets of it.

    Keys: `top1_k20`, `top5_k20`, ... for the full train set; `{n}shot_top1_k20` (mean over `n_tries` draws of
    n samples per class, seeds seed .. seed + n_tries - 1) and `{n}shot_top1_k20_std` for few-shot. A k larger
    than the train (sub)set is left out and listed under `skipped` by `knn_evaluate_report`.
    """
    return knn_evaluate_report(train_features, train_labels, test_features, test_labels, ks, temperature,
                               n_per_class, n_tries, seed, num_classes, device, train_chunk_size,
                               test_chunk_size)["metrics"]


def knn_evaluate_report(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    n_per_class: Sequence[int] = (),
    n_tries: int = 1,
    seed: int = 0,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    train_chunk_size: int = 65536,
    test_chunk_size: int = 4096,
) -> dict:
    """`knn_evaluate` plus table rows ({train, k, top1, top5, tries}) and the skipped (train, k) with reasons."""
    if n_tries < 1:
        raise ValueError(f"n_tries must be >= 1, got {n_tries}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1 if num_classes is None else num_classes
    chunks = {"device": device, "train_chunk_size": train_chunk_size, "test_chunk_size": test_chunk_size}
    metrics: dict[str, float] = {}
    rows: list[dict] = []
    skipped: list[dict] = []

    def usable_ks(n_train: int, subset: str) -> list[int]:
        fitting, left_out = fit_ks(ks, n_train)
        for k, reason in left_out.items():
            skipped.append({"train": subset, "k": k, "reason": reason})
            logger.warning("k-NN on the %s train set: k=%d left out (%s)", subset, k, reason)
        return fitting

    full_ks = usable_ks(len(train_labels), "full")
    if full_ks:
        scores = knn_scores(train_features, train_labels, test_features, full_ks, temperature, num_classes, **chunks)
        for k in full_ks:
            acc = topk_accuracy(scores[k], test_labels)
            metrics[f"top1_k{k}"], metrics[f"top5_k{k}"] = acc[1], acc[5]
            rows.append({"train": "full", "k": k, "top1": acc[1], "top5": acc[5], "tries": 1})

    for n in n_per_class:
        subset = f"{n}shot"
        subset_size = int(torch.bincount(train_labels.cpu()).clamp(max=n).sum())  # the same for every draw
        subset_ks = usable_ks(subset_size, subset)
        tries: dict[int, list[dict[int, float]]] = {}
        for t in range(n_tries if subset_ks else 0):
            idx = few_shot_indices(train_labels, n, seed + t)
            scores = knn_scores(train_features[idx], train_labels[idx], test_features, subset_ks, temperature,
                                num_classes, **chunks)
            for k in subset_ks:
                tries.setdefault(k, []).append(topk_accuracy(scores[k], test_labels))
        for k, accs in tries.items():
            top1 = torch.tensor([a[1] for a in accs], dtype=torch.float64)
            top5 = torch.tensor([a[5] for a in accs], dtype=torch.float64)
            metrics[f"{subset}_top1_k{k}"] = top1.mean().item()
            metrics[f"{subset}_top5_k{k}"] = top5.mean().item()
            metrics[f"{subset}_top1_k{k}_std"] = top1.std(unbiased=False).item()
            rows.append({"train": subset, "k": k, "top1": top1.mean().item(), "top5": top5.mean().item(),
                         "tries": len(accs)})
    return {"metrics": metrics, "rows": rows, "skipped": skipped}


def fit_ks(ks: Sequence[int], n_train: int) -> tuple[list[int], dict[int, str]]:
    """The ks a bank of `n_train` samples can answer, and why each other k is left out.

    A k above the bank is left out; when every k is, the bank's size is used as the one k (each left-out k says
    so), because an evaluation that exits with no number at all looks like success in a results table.
    """
    fitting = [k for k in ks if k <= n_train]
    left_out = {k: f"k > {n_train} train samples" for k in ks if k > n_train}
    if not fitting and n_train > 0:
        fitting = [n_train]
        left_out = {k: f"{reason}; clamped to k={n_train}" for k, reason in left_out.items()}
    return fitting, left_out


def few_shot_indices(labels: Tensor, n_per_class: int, seed: int) -> Tensor:
    """Sorted indices of `n_per_class` random samples of every class (all of a class that has fewer)."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:n_per_class]])
    return torch.cat(picked).sort().values


def _check_inputs(train_features: Tensor, train_labels: Tensor, test_features: Tensor, ks: Sequence[int],
                  temperature: float) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D [N, D], got train {tuple(train_features.shape)}, test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features are {train_features.shape[1]}-d but test features {test_features.shape[1]}-d")
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} train labels")
    if len(train_features) == 0:
        raise ValueError("the k-NN train set is empty")
    if not ks or min(ks) < 1 or max(ks) > len(train_features):
        raise ValueError(f"every k must be in [1, {len(train_features)}] (the train set size), got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
