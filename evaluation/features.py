"""Frozen-backbone feature extraction over a labelled dataset, on one process or shared by all of them.

Every process runs the backbone on its own strided share of the samples (`sharding.rank_indices`) and the
shares are gathered back into dataset order on every rank, so the result is the same whatever the world size.
Runs under `torch.inference_mode`, with autocast on CUDA.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinoforge.collectives import (
    current_rank,
    current_world_size,
    gather_in_dataset_order,
    rank_indices,
    sum_over_ranks,
)
from dinoforge.precision import autocast
from evaluation.feature_set import FeatureSet

logger = logging.getLogger(__name__)

# the evaluation config names torch dtypes; CPU features stay fp32 (the reference numbers are fp32 on CPU)
PRECISION_OF = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    n_last_blocks: int = 1,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: str = "bfloat16",
    distributed: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """Features of every sample of `dataset` (items `(image_tensor, label)`), in dataset order.

    With `distributed` and an initialised process group this is a collective: every rank must call it with the
    same dataset, and every rank gets the whole result. The model must be the bare backbone (it needs
    `get_intermediate_layers`), already on `device`; its train/eval mode is left to the caller.
    """
    device = torch.device(device)
    if autocast_dtype not in PRECISION_OF:
        raise ValueError(f"autocast_dtype={autocast_dtype!r}; choose one of {sorted(PRECISION_OF)}")
    if not hasattr(model, "get_intermediate_layers"):
        raise TypeError(f"{type(model).__name__} has no get_intermediate_layers; pass the unwrapped ViT backbone")
    n_total = len(dataset)
    world, me = (current_world_size(), current_rank()) if distributed else (1, 0)
    indices = rank_indices(n_total, me, world)
    errors_before = decode_error_count(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    dim = model.embed_dim
    block_cls: list[Tensor] = [torch.zeros(0, n_last_blocks, dim)]
    patch_mean: list[Tensor] = [torch.zeros(0, dim)]
    labels: list[Tensor] = [torch.zeros(0, dtype=torch.long)]
    n_batches, example = 0, None
    with torch.inference_mode(), autocast(device, PRECISION_OF[autocast_dtype] if device.type == "cuda" else "fp32"):
        for images, targets in tqdm(loader, desc=desc, disable=me != 0, leave=False):
            layers = model.get_intermediate_layers(images.to(device, non_blocking=True), n=n_last_blocks,
                                                   return_class_token=True, norm=True)
            block_cls.append(torch.stack([cls for _, cls in layers], dim=1).float().cpu())
            patch_mean.append(layers[-1][0].float().mean(dim=1).cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.long).reshape(-1))
            n_batches, example = n_batches + 1, images[:1]
        # An FSDP-sharded backbone gathers its parameters inside forward, collectively: every rank must run as
        # many forwards as rank 0, whose share is the largest. Extra forwards on one sample; outputs unused.
        rank0_batches = math.ceil(len(rank_indices(n_total, 0, world)) / batch_size)
        for _ in range(rank0_batches - n_batches):
            example = example if example is not None else dataset[0][0][None]
            model.get_intermediate_layers(example.to(device), n=n_last_blocks, return_class_token=True, norm=True)
    decode_errors = decode_error_count(dataset) - errors_before
    local = (torch.cat(block_cls), torch.cat(patch_mean), torch.cat(labels))
    if world > 1:
        local = tuple(gather_in_dataset_order(t, n_total) for t in local)
        decode_errors = sum_over_ranks(decode_errors)
    features = FeatureSet(labels=local[2], block_cls=local[0], patch_mean=local[1], decode_errors=decode_errors)
    if decode_errors:
        logger.warning("%s: %d unreadable sample(s) were replaced by their readable neighbours", desc, decode_errors)
    return features


def decode_error_count(dataset: Dataset) -> int:
    """The reader's count of unreadable samples so far (0 for datasets that do not count), through Subsets."""
    while not hasattr(dataset, "decode_errors") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return int(getattr(dataset, "decode_errors", 0))
