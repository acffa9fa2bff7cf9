"""Batch multi-crop samples and build the iBOT masks, their flat token indices and per-token loss weights.

Crops are stacked crop-major (all first global crops, then all second ones), as the DINOv2 meta-architecture
expects. Mask ratios are stratified: of the n global crops, int(n * mask_probability) get a mask whose ratio is
drawn uniformly in one of the consecutive slices of linspace(min, max, k + 1) (one slice each), the rest get none,
and the assignment is shuffled. Each masked token is weighted 1 / (masked tokens of its image), so every masked
image contributes equally to the iBOT loss and the weights sum to the number of masked images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pretrain.data.seeding import MASK_PLAN, MASK_SHAPE, derive_seed

MaskRatio = tuple[float, float] | None  # (low, high) slice of the mask ratio, or None for "no mask"


def stratified_mask_ratios(
    n_crops: int, mask_ratio_tuple: tuple[float, float], mask_probability: float, rng: random.Random
) -> list[MaskRatio]:
    """One entry per crop: the ratio slice it draws its mask ratio from, or None; shuffled with `rng`."""
    n_masked = int(n_crops * mask_probability)
    edges = np.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked + 1)
    plan: list[MaskRatio] = [(float(edges[i]), float(edges[i + 1])) for i in range(n_masked)]
    plan += [None] * (n_crops - n_masked)
    rng.shuffle(plan)
    return plan


def draw_mask(
    ratio: MaskRatio, n_tokens: int, mask_generator: Callable[..., np.ndarray], rng: random.Random
) -> tuple[torch.Tensor, int]:
    """(flat bool mask [n_tokens], its upper bound int(n_tokens * high)) for one crop's ratio slice."""
    if ratio is None:
        return torch.zeros(n_tokens, dtype=torch.bool), 0
    low, high = ratio
    mask = mask_generator(int(n_tokens * rng.uniform(low, high)), rng)
    return torch.from_numpy(mask).flatten(), int(n_tokens * high)


def mask_batch_fields(masks: torch.Tensor, upperbound: int) -> dict[str, Any]:
    """`masks` [n_crops, n_tokens] bool -> the mask entries of a batch (indices into the flat [n_crops*n_tokens])."""
    mask_indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / per_image).expand_as(masks)[masks]
    return {
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        # A 1-element tensor like the reference, so it can move to the device with the batch.
        "n_masked_patches": torch.full((1,), mask_indices.numel(), dtype=torch.long),
        "upperbound": upperbound,
    }


def stack_crops(samples: Sequence[dict[str, Any]], dtype: torch.dtype) -> dict[str, Any]:
    """Crop-major stacks of the global and local crops (and of their photometric parameters when the device is to
    apply them), their number per image (`n_global_crops`, as the multi-crop augmentation made them), labels,
    positions and the decode-error count."""
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    # uint8 crops (photometric="batched") stay uint8 until the device finishes them
    crop_dtype = torch.uint8 if samples[0]["global_crops"][0].dtype == torch.uint8 else dtype
    batch: dict[str, Any] = {
        "global_crops": torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples]).to(crop_dtype),
        "n_global_crops": n_global,  # the loss pairs crops by it (SSLMetaArch)
        "n_decode_errors": sum(int(s.get("n_decode_errors", 0)) for s in samples),
    }
    if n_local:
        batch["local_crops"] = torch.stack(
            [s["local_crops"][i] for i in range(n_local) for s in samples]).to(crop_dtype)
    else:
        batch["local_crops"] = torch.empty(0, *batch["global_crops"].shape[1:2], 0, 0, dtype=crop_dtype)
    for key in ("global_photometric", "local_photometric"):
        if key in samples[0]:  # [crops, P] per sample -> [crops * batch, P], crop-major like the crops
            batch[key] = torch.stack([s[key] for s in samples], dim=1).flatten(0, 1)
    if all("label" in s for s in samples):
        batch["labels"] = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    if all("position" in s for s in samples):
        batch["positions"] = torch.tensor([int(s["position"]) for s in samples], dtype=torch.long)
    return batch


def collate_multicrop(
    samples: Sequence[dict[str, Any]],
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    *,
    n_tokens: int,
    mask_generator: Callable[..., np.ndarray],
    dtype: torch.dtype = torch.float32,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """Collate multi-crop samples (dicts with "global_crops", "local_crops", optional "label", "n_decode_errors").

    Returns `global_crops` [2B,3,H,W], `local_crops` [nL*B,3,h,w] (crop-major), `n_global_crops` (2: the
    augmentation's count, which the loss pairs crops by), `masks` [2B, n_tokens] bool,
    `mask_indices` [M], `masks_weight` [M], `n_masked_patches` (LongTensor [1] holding M), `upperbound`, `labels`
    [B] when every sample has one, `n_decode_errors`. Mask ratios are stratified over this batch's global crops
    and drawn from `rng` (default: the `random` module, which DataLoader seeds per worker).
    """
    if not samples:
        raise ValueError("collate_multicrop got an empty batch")
    rng = rng if rng is not None else random.Random(random.getrandbits(64))
    batch = stack_crops(samples, dtype)
    n_crops = batch["global_crops"].shape[0]
    plan = stratified_mask_ratios(n_crops, mask_ratio_tuple, mask_probability, rng)
    drawn = [draw_mask(ratio, n_tokens, mask_generator, rng) for ratio in plan]
    masks = torch.stack([mask for mask, _ in drawn])
    batch.update(mask_batch_fields(masks, upperbound=sum(bound for _, bound in drawn)))
    return batch


class GlobalBatchCollator:
    """Collate for `StepSampler` batches whose masks do not depend on the number of processes or workers.

    Samples carry their stream `position`. The mask-ratio plan is stratified over the 2G global crops of the whole
    global batch (seeded by the step) and each crop's mask is drawn from a generator seeded by (position, crop), so
    rank r of W collates exactly its slice of what a single process would build for the same global batch.
    """

    def __init__(
        self,
        global_batch: int,
        n_tokens: int,
        mask_generator: Callable[..., np.ndarray],
        mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.global_batch = global_batch
        self.n_tokens = n_tokens
        self.mask_generator = mask_generator
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = mask_probability
        self.seed = seed
        self.dtype = dtype

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("GlobalBatchCollator got an empty batch")
        batch = stack_crops(samples, self.dtype)
        positions = [int(s["position"]) for s in samples]
        steps = {p // self.global_batch for p in positions}
        if len(steps) != 1:
            raise ValueError(
                f"a batch spans steps {sorted(steps)}: the DataLoader batch size must equal the per-rank share of "
                f"the global batch ({self.global_batch})"
            )
        step = steps.pop()
        n_global = len(samples[0]["global_crops"])
        plan_rng = random.Random(derive_seed(self.seed, MASK_PLAN, step))
        plan = stratified_mask_ratios(
            n_global * self.global_batch, self.mask_ratio_tuple, self.mask_probability, plan_rng
        )
        masks, upperbound = [], 0
        for crop in range(n_global):  # crop-major, like the stacked crops
            for position in positions:
                ratio = plan[crop * self.global_batch + position % self.global_batch]
                rng = random.Random(derive_seed(self.seed, MASK_SHAPE, position, crop))
                mask, bound = draw_mask(ratio, self.n_tokens, self.mask_generator, rng)
                masks.append(mask)
                upperbound += bound
        batch.update(mask_batch_fields(torch.stack(masks), upperbound))
        batch["step"] = step
        return batch
