"""iBOT block masking: budget respected, blocks of at least min_num_patches, aspect ratios, determinism."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pretrain.data.masking import MaskingGenerator


def test_masks_shape_and_budget() -> None:
    gen = MaskingGenerator((14, 14), max_num_patches=0.5 * 196)
    rng = random.Random(0)
    assert gen(0, rng).shape == (14, 14) and gen(0, rng).dtype == bool and not gen(0, rng).any()
    for request in (19, 40, 60, 98):
        counts = np.array([gen(request, rng).sum() for _ in range(200)])
        assert counts.max() <= request
        assert counts.mean() >= 0.95 * request  # blocks are added until the budget is (almost) used


def test_masks_are_rectangles_of_at_least_min_patches() -> None:
    gen = MaskingGenerator((14, 14), max_num_patches=98, min_num_patches=4)
    rng = random.Random(1)
    for request in range(4, 8):
        counts = {int(gen(request, rng).sum()) for _ in range(300)}
        assert counts <= {0, *range(4, request + 1)}, f"request {request} gave {sorted(counts)}"
        assert counts - {0}


def single_blocks(gen: MaskingGenerator, budget: int, n: int) -> list[tuple[int, int]]:
    """(height, width) of `n` blocks, each added to an empty mask."""
    rng, shapes = random.Random(2), []
    for _ in range(n):
        mask = np.zeros((gen.height, gen.width), dtype=bool)
        added = gen.add_block(mask, budget, rng)
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert added == mask.sum() == h * w  # one filled rectangle
        shapes.append((int(h), int(w)))
    return shapes


def test_block_aspect_ratios_span_the_range() -> None:
    gen = MaskingGenerator((16, 16), max_num_patches=40, min_aspect=0.3)
    shapes = single_blocks(gen, 40, 400)
    aspects = np.array([h / w for h, w in shapes])
    assert min(h * w for h, w in shapes) >= 4 and max(h * w for h, w in shapes) <= 40
    # log-uniform in [0.3, 3.33] before rounding the sides: both orientations, nothing beyond rounding slack
    assert aspects.min() < 0.5 and aspects.max() > 2.0
    assert aspects.min() >= 0.3 / 1.6 and aspects.max() <= 3.34 * 1.6
    assert abs(np.log(aspects).mean()) < 0.15  # symmetric in log space


def test_narrow_aspect_range_gives_square_blocks() -> None:
    gen = MaskingGenerator((16, 16), max_num_patches=36, min_aspect=1.0)
    shapes = single_blocks(gen, 36, 200)
    assert shapes and all(abs(h - w) <= 1 for h, w in shapes)


def test_seeded_rng_is_deterministic_and_module_random_is_default() -> None:
    gen = MaskingGenerator((8, 12), max_num_patches=48)
    a = [gen(30, random.Random(5)) for _ in range(3)]
    b = [gen(30, random.Random(5)) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    random.seed(7)
    c = gen(30)
    random.seed(7)
    assert np.array_equal(c, gen(30)) and c.shape == (8, 12)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_aspect"):
        MaskingGenerator(8, min_aspect=2.0, max_aspect=1.0)
    with pytest.raises(ValueError, match="positive"):
        MaskingGenerator((0, 8))
