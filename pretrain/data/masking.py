"""iBOT block masking (BEiT's generator, as used by DINOv2): masks made of random rectangles of patches.

Each rectangle has an area drawn uniformly between `min_num_patches` and what is left of the budget (capped by
`max_num_patches`), and an aspect ratio drawn log-uniformly in [min_aspect, max_aspect]. Rectangles are added until
the requested number of patches is masked or ten placements in a row add nothing.

One difference from the reference: it rounds the rectangle's sides after drawing the area, so a "min 4 patches"
block can come out as 1x3; here a rectangle smaller than `min_num_patches` (or than the remaining budget, when that
is smaller) is redrawn, so every block really has at least `min_num_patches` patches.
"""

from __future__ import annotations

import math
import random
from types import ModuleType

import numpy as np

# Placement attempts per rectangle before giving up on adding more (the reference's constant).
PLACEMENT_ATTEMPTS = 10


class MaskingGenerator:
    """`gen(n)` -> boolean [h, w] mask with at most `n` (usually close to `n`) patches masked in rectangular blocks."""

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        low, high = (math.exp(v) for v in self.log_aspect_ratio)
        return (
            f"MaskingGenerator({self.height}x{self.width}, blocks of {self.min_num_patches}..{self.max_num_patches} "
            f"patches, aspect {low:.2f}..{high:.2f})"
        )

    def __call__(self, num_masking_patches: int = 0, rng: random.Random | None = None) -> np.ndarray:
        """A mask with at most `num_masking_patches` True entries; draws from `rng` (default: module `random`)."""
        rng = rng if rng is not None else random  # the module's functions draw from its seeded global generator
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self.add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask

    def add_block(self, mask: np.ndarray, budget: float, rng: random.Random | ModuleType) -> int:
        """Mask one rectangle adding between 1 and `budget` new patches; the number added (0 on failure)."""
        min_area = min(self.min_num_patches, budget)
        for _ in range(PLACEMENT_ATTEMPTS):
            target_area = rng.uniform(min_area, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if h * w < min_area or h >= self.height or w >= self.width:
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            block = mask[top : top + h, left : left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0
