"""Seeds derived from (run seed, purpose, position), so randomness depends on what is drawn, not who draws it.

Augmentations, mask plans and epoch permutations are seeded from the global sample position or step, never from
the worker or rank that happens to compute them: resuming, or running on a different number of processes or
DataLoader workers, then reproduces the same batches bit for bit.
"""

from __future__ import annotations

import numpy as np

# Purposes, mixed into the seed so two streams drawn for the same position are independent.
EPOCH_PERMUTATION = 1
AUGMENTATION = 2
MASK_PLAN = 3
MASK_SHAPE = 4
STREAM_SHARDS = 5


def derive_seed(*parts: int) -> int:
    """A 63-bit seed hashed from non-negative integers (numpy's SeedSequence mixing; stable across platforms)."""
    if any(p < 0 for p in parts):
        raise ValueError(f"seed parts must be non-negative integers, got {parts}")
    high, low = np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) ^ int(low)
