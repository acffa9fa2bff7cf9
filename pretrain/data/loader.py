"""The pretraining DataLoader: dataset spec + multi-crop + masks -> batches for one rank.

Map-style path (default, exact): `StepSampler` decides which samples make step s's global batch, each sample's
augmentation is seeded by its stream position and the masks by (step, position), so resuming at a step or running
on another number of processes or workers reproduces the same batches bit for bit.

Streaming path (`streaming=True`, for WebDataset pools too large to index): shards resampled forever per rank and
worker; reproducible for a fixed (seed, world, num_workers, start_step) but not across them, and resume does not
replay the exact order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from omegaconf import MISSING
from torch.utils.data import DataLoader

from dinoforge.data.datasets import build_dataset
from dinoforge.data.decode import DEFAULT_MAX_PIXELS
from pretrain.data.collate import GlobalBatchCollator, collate_multicrop
from pretrain.data.masking import MaskingGenerator
from pretrain.data.multicrop import MultiCropAugmentation, MultiCropConfig
from pretrain.data.multicrop_dataset import MultiCropDataset
from pretrain.data.samplers import PositionSampler, StepSampler
from pretrain.data.seeding import STREAM_SHARDS, derive_seed
from pretrain.data.streaming import webdataset_stream

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Pretraining data: where the images are, how they are batched, augmented and masked."""

    # any spec `build_dataset` accepts: ImageFolder or flat image dir, file list, shards, curate run dir
    dataset: str = MISSING
    batch_size_per_rank: int = 64
    num_workers: int = 8
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # iBOT mask ratio range, stratified over global crops
    mask_probability: float = 0.5  # fraction of global crops that get a mask
    mask_min_patches: int = 4  # smallest masked block
    mask_max_ratio_per_block: float = 0.5  # largest block, as a fraction of the patch grid (DINOv2: 0.5)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decode limit against decompression bombs
    prefetch_factor: int = 2
    # Niceness added to each worker process (0-19). On a CPU-only machine the workers and the training threads share
    # the cores; a worker that preempts one of torch's threads stalls the other at the next barrier. Niced workers
    # run in the trainer's gaps (cpu_tiny on 2 cores: 0.80 s a step with the batches preloaded, 1.23 s with 2
    # workers, 0.95 s with them niced). Leave 0 where the cores outnumber the workers and threads (GPU nodes).
    worker_nice: int = 0
    streaming: bool = False  # True: stream WebDataset shards (resampled) instead of random access
    shuffle_buffer: int = 1000  # streaming only: samples mixed across shards

    def __post_init__(self) -> None:
        low, high = self.mask_ratio_min_max
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {self.mask_ratio_min_max}")
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {self.mask_probability}")
        if self.batch_size_per_rank <= 0 or self.num_workers < 0:
            raise ValueError("batch_size_per_rank must be > 0 and num_workers >= 0")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError(f"data.worker_nice must be in 0-19 (a niceness increment), got {self.worker_nice}")


def lower_worker_priority(increment: int, worker_id: int) -> None:
    """DataLoader `worker_init_fn`: raise this worker's niceness by `increment` (POSIX; a no-op elsewhere)."""
    if increment and hasattr(os, "nice"):
        os.nice(increment)


def build_pretrain_loader(
    dataset_spec: str,
    multicrop_cfg: MultiCropConfig,
    batch_size_per_rank: int,
    rank: int,
    world: int,
    seed: int,
    start_step: int,
    num_workers: int,
    patch_size: int,
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    mask_min_patches: int = 4,
    mask_max_ratio_per_block: float = 0.5,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    dtype: torch.dtype = torch.float32,
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
    streaming: bool = False,
    shuffle_buffer: int = 1000,
    worker_nice: int = 0,
) -> tuple[DataLoader, StepSampler | None]:
    """(DataLoader of collated batches for `rank`, its `StepSampler`; None when streaming).

    Batches are dicts (see `collate_multicrop`); the map-style path adds `positions` [B] and `step`. Iterating the
    loader is infinite: step `start_step + k` is the k-th batch.
    """
    grid = multicrop_cfg.global_crops_size // patch_size
    if grid * patch_size != multicrop_cfg.global_crops_size:
        logger.warning(
            "global_crops_size %d is not a multiple of patch_size %d; the mask grid is %dx%d",
            multicrop_cfg.global_crops_size, patch_size, grid, grid,
        )
    n_tokens = grid * grid
    mask_generator = MaskingGenerator(
        (grid, grid), max_num_patches=mask_max_ratio_per_block * n_tokens, min_num_patches=mask_min_patches
    )
    augmentation = MultiCropAugmentation(multicrop_cfg)
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    worker_options: dict[str, Any] = (
        {"prefetch_factor": prefetch_factor, "persistent_workers": True,
         "worker_init_fn": partial(lower_worker_priority, worker_nice)} if num_workers > 0 else {}
    )
    generator = torch.Generator().manual_seed(derive_seed(seed, STREAM_SHARDS, rank, start_step))
    if streaming:
        stream = webdataset_stream(
            dataset_spec, transform=augmentation, resampled=True, seed=derive_seed(seed, start_step),
            rank=rank, world=world, max_pixels=max_pixels, shuffle_buffer=shuffle_buffer, as_dict=True,
        )
        stream.append(flatten_multicrop_samples)
        collate = partial(
            collate_multicrop, mask_ratio_tuple=tuple(mask_ratio_tuple), mask_probability=mask_probability,
            n_tokens=n_tokens, mask_generator=mask_generator, dtype=dtype,
        )
        loader = DataLoader(
            stream, batch_size=batch_size_per_rank, num_workers=num_workers, collate_fn=collate,
            pin_memory=pin_memory, drop_last=True, generator=generator, **worker_options,
        )
        logger.info("pretrain data (streaming, rank %d/%d): %s", rank, world, dataset_spec)
        return loader, None

    images = build_dataset(dataset_spec, transform=None, with_labels=True, max_pixels=max_pixels, labels_required=False)
    # Read one sample here, before any worker starts: a dataset with nothing readable (a text file given as a file
    # list, a folder of non-images) then fails with its DatasetError in this process instead of inside a worker.
    images.load(0)
    dataset = MultiCropDataset(images, augmentation, seed=seed)
    sampler = StepSampler(len(dataset), batch_size_per_rank * world, rank, world, seed=seed, start_step=start_step)
    collate = GlobalBatchCollator(
        global_batch=batch_size_per_rank * world, n_tokens=n_tokens, mask_generator=mask_generator,
        mask_ratio_tuple=tuple(mask_ratio_tuple), mask_probability=mask_probability, seed=seed, dtype=dtype,
    )
    loader = DataLoader(
        dataset, batch_size=batch_size_per_rank, sampler=PositionSampler(sampler), num_workers=num_workers,
        collate_fn=collate, pin_memory=pin_memory, drop_last=False, generator=generator, **worker_options,
    )
    logger.info("pretrain data (rank %d/%d): %s; %r", rank, world, images.describe(), sampler)
    return loader, sampler


def build_pretrain_loader_from_config(
    cfg: DataConfig,
    rank: int,
    world: int,
    seed: int,
    start_step: int,
    patch_size: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[DataLoader, StepSampler | None]:
    """`build_pretrain_loader` with the values of a `DataConfig`."""
    return build_pretrain_loader(
        cfg.dataset, cfg.multicrop, cfg.batch_size_per_rank, rank=rank, world=world, seed=seed,
        start_step=start_step, num_workers=cfg.num_workers, patch_size=patch_size,
        mask_ratio_tuple=tuple(cfg.mask_ratio_min_max), mask_probability=cfg.mask_probability,
        mask_min_patches=cfg.mask_min_patches, mask_max_ratio_per_block=cfg.mask_max_ratio_per_block,
        max_pixels=cfg.max_pixels, dtype=dtype, prefetch_factor=cfg.prefetch_factor, streaming=cfg.streaming,
        shuffle_buffer=cfg.shuffle_buffer, worker_nice=cfg.worker_nice,
    )


def flatten_multicrop_samples(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Streaming stage: {"image": crops, "label", ...} -> the sample dict `collate_multicrop` expects."""
    for sample in src:
        yield {**sample["image"], "label": sample["label"], "n_decode_errors": sample["n_decode_errors"]}
