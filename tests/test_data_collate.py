"""Collate: crop-major stacking, stratified mask ratios, mask indices/weights against direct formulas, and the
global-batch collator's independence from the number of ranks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pretrain.data.collate import GlobalBatchCollator, collate_multicrop, stratified_mask_ratios
from pretrain.data.masking import MaskingGenerator

GRID = 8
N_TOKENS = GRID * GRID


def fake_samples(batch: int, n_local: int = 3, start: int = 0) -> list[dict]:
    """Samples whose crop pixels encode (sample, crop) so the stacking order can be read back (exact in bf16)."""
    samples = []
    for b in range(start, start + batch):
        samples.append(
            {
                "global_crops": [torch.full((3, 16, 16), 10.0 * b + c) for c in range(2)],
                "local_crops": [torch.full((3, 8, 8), 10.0 * b + 5 + c) for c in range(n_local)],
                "label": b % 5,
                "position": b,
                "n_decode_errors": b % 2,
            }
        )
    return samples


@pytest.fixture()
def generator() -> MaskingGenerator:
    return MaskingGenerator((GRID, GRID), max_num_patches=0.5 * N_TOKENS)


def test_shapes_order_labels_and_error_count(generator: MaskingGenerator) -> None:
    batch = collate_multicrop(
        fake_samples(4), n_tokens=N_TOKENS, mask_generator=generator, dtype=torch.bfloat16, rng=random.Random(0)
    )
    assert batch["global_crops"].shape == (8, 3, 16, 16) and batch["global_crops"].dtype == torch.bfloat16
    assert batch["local_crops"].shape == (12, 3, 8, 8)
    # crop-major: all first global crops, then all second ones (and likewise for locals)
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31]
    assert batch["local_crops"][:, 0, 0, 0].tolist() == [5, 15, 25, 35, 6, 16, 26, 36, 7, 17, 27, 37]
    assert batch["labels"].tolist() == [0, 1, 2, 3]
    assert batch["n_decode_errors"] == 2
    assert batch["masks"].shape == (8, N_TOKENS) and batch["masks"].dtype == torch.bool


def test_mask_indices_weights_and_counts_match_direct_formulas(generator: MaskingGenerator) -> None:
    for seed in range(5):
        batch = collate_multicrop(fake_samples(6), n_tokens=N_TOKENS, mask_generator=generator, rng=random.Random(seed))
        masks = batch["masks"]
        flat = masks.flatten()
        expected_indices = [i for i in range(flat.numel()) if flat[i]]
        assert batch["mask_indices"].tolist() == expected_indices
        assert batch["n_masked_patches"].tolist() == [len(expected_indices)]
        expected_weights = [1.0 / int(masks[i // N_TOKENS].sum()) for i in expected_indices]
        torch.testing.assert_close(batch["masks_weight"], torch.tensor(expected_weights))
        masked_images = int((masks.sum(1) > 0).sum())
        assert masked_images == int(12 * 0.5)  # every planned mask is non-empty at these ratios
        assert batch["masks_weight"].sum().item() == pytest.approx(masked_images)
        edges = np.linspace(0.1, 0.5, masked_images + 1)
        assert batch["upperbound"] == sum(int(N_TOKENS * high) for high in edges[1:])
        assert int(masks.sum()) <= batch["upperbound"]


def test_mask_ratios_are_stratified_and_shuffled() -> None:
    plans = [stratified_mask_ratios(10, (0.1, 0.5), 0.5, random.Random(s)) for s in range(20)]
    edges = np.linspace(0.1, 0.5, 6)
    for plan in plans:
        slices = sorted(r for r in plan if r is not None)
        assert len(slices) == 5 and plan.count(None) == 5
        np.testing.assert_allclose(slices, list(zip(edges[:-1], edges[1:], strict=True)))
    assert len({tuple(r is None for r in plan) for plan in plans}) > 5  # positions vary with the generator
    assert stratified_mask_ratios(3, (0.1, 0.5), 0.0, random.Random(0)) == [None] * 3


def test_drawn_ratios_fall_in_their_slices(generator: MaskingGenerator) -> None:
    """Sorted per-image masked fractions: the k-th lies in (about) the k-th slice over many batches."""
    n_masked = 6
    edges = np.linspace(0.1, 0.5, n_masked + 1)
    for seed in range(10):
        batch = collate_multicrop(fake_samples(6), n_tokens=N_TOKENS, mask_generator=generator, rng=random.Random(seed))
        fractions = sorted(float(f) for f in batch["masks"].sum(1) / N_TOKENS if f > 0)
        assert len(fractions) == n_masked
        for k, fraction in enumerate(fractions):
            assert fraction <= edges[k + 1] + 1e-9
            assert fraction >= edges[k] - 2.5 / N_TOKENS  # int() truncation and rare placement undershoot


def test_global_batch_collator_is_independent_of_world_size(generator: MaskingGenerator) -> None:
    global_batch = 8
    collate = GlobalBatchCollator(global_batch, N_TOKENS, generator, seed=3)
    step = 5
    samples = fake_samples(global_batch, start=step * global_batch)
    whole = collate(samples)
    assert whole["step"] == step and whole["positions"].tolist() == list(range(40, 48))
    for world in (2, 4):
        local = global_batch // world
        parts = [collate(samples[r * local : (r + 1) * local]) for r in range(world)]
        for r, part in enumerate(parts):
            for crop in range(2):
                rows = slice(crop * global_batch + r * local, crop * global_batch + (r + 1) * local)
                assert torch.equal(part["masks"][crop * local : (crop + 1) * local], whole["masks"][rows])
                assert torch.equal(part["global_crops"][crop * local : (crop + 1) * local], whole["global_crops"][rows])
        assert sum(p["upperbound"] for p in parts) == whole["upperbound"]
        assert sum(int(p["n_masked_patches"]) for p in parts) == int(whole["n_masked_patches"])
    assert int((whole["masks"].sum(1) > 0).sum()) == global_batch  # int(2G * 0.5) masked over the global batch
    other_step = collate(fake_samples(global_batch, start=(step + 1) * global_batch))
    assert not torch.equal(other_step["masks"], whole["masks"])


def test_collator_rejects_batches_spanning_steps(generator: MaskingGenerator) -> None:
    collate = GlobalBatchCollator(4, N_TOKENS, generator)
    with pytest.raises(ValueError, match="spans steps"):
        collate(fake_samples(4, start=2))
    with pytest.raises(ValueError, match="empty batch"):
        collate_multicrop([], n_tokens=N_TOKENS, mask_generator=generator)
