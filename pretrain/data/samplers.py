"""`StepSampler`: the training data order as a function of the step, identical for any number of processes.

The sample stream is the concatenation of seeded random permutations of the dataset, one per epoch. The global
batch of step s is `stream[s*G : (s+1)*G]` and rank r of W takes its contiguous chunk of G/W positions. A step
therefore sees the same samples whatever W is, so a run resumed on another number of processes continues the
exact data order, and `start_step` resumes without replaying earlier steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from typing import Any

import torch
from torch.utils.data import Sampler

from pretrain.data.seeding import EPOCH_PERMUTATION, derive_seed


class StepSampler(Sampler[int]):
    """Infinite, deterministic stream of dataset indices for one rank, starting at `start_step`."""

    def __init__(
        self, dataset_len: int, global_batch: int, rank: int, world: int, seed: int = 0, start_step: int = 0
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if world <= 0 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        if global_batch <= 0 or global_batch % world:
            raise ValueError(
                f"global_batch ({global_batch}) must be a positive multiple of the number of processes ({world}); "
                "set batch_size_per_rank so that batch_size_per_rank * world is the global batch"
            )
        if start_step < 0 or seed < 0:
            raise ValueError(f"start_step and seed must be >= 0, got {start_step}, {seed}")
        self.dataset_len = dataset_len
        self.global_batch = global_batch
        self.rank = rank
        self.world = world
        self.seed = seed
        self.start_step = start_step
        self.local_batch = global_batch // world
        self._permutations: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        """The dataset order of `epoch`; the two most recently built are cached (a batch spans at most two)."""
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, EPOCH_PERMUTATION, epoch))
            self._permutations[epoch] = torch.randperm(self.dataset_len, generator=generator)
            while len(self._permutations) > 2:
                del self._permutations[next(iter(self._permutations))]  # oldest inserted
        return self._permutations[epoch]

    def index_at(self, position: int) -> int:
        """The dataset index at `position` of the infinite stream."""
        epoch, offset = divmod(position, self.dataset_len)
        return int(self.permutation(epoch)[offset])

    def positions(self, step: int) -> range:
        """Stream positions this rank reads at `step`."""
        start = step * self.global_batch + self.rank * self.local_batch
        return range(start, start + self.local_batch)

    def global_batch_indices(self, step: int) -> list[int]:
        """All dataset indices of the global batch of `step`, in rank order."""
        start = step * self.global_batch
        return [self.index_at(p) for p in range(start, start + self.global_batch)]

    def iter_positions(self) -> Iterator[tuple[int, int]]:
        """Infinite (stream position, dataset index) pairs of this rank from `start_step` on."""
        for step in count(self.start_step):
            for position in self.positions(step):
                yield position, self.index_at(position)

    def __iter__(self) -> Iterator[int]:
        return (index for _, index in self.iter_positions())

    def state_dict(self, next_step: int | None = None) -> dict[str, Any]:
        """What a checkpoint needs to continue this order at `next_step` (default: `start_step`)."""
        step = self.start_step if next_step is None else next_step
        return {"seed": self.seed, "dataset_len": self.dataset_len, "global_batch": self.global_batch, "step": step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpointed order; the world size may differ, the order-defining values may not."""
        for key in ("seed", "dataset_len", "global_batch"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order: checkpoint has {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; the same dataset, seed and global batch are needed for an exact resume"
                )
        self.start_step = int(state["step"])

    def __repr__(self) -> str:
        return (
            f"StepSampler(dataset_len={self.dataset_len}, global_batch={self.global_batch}, rank={self.rank}/"
            f"{self.world}, seed={self.seed}, start_step={self.start_step})"
        )


class PositionSampler(Sampler[tuple[int, int]]):
    """A `StepSampler` yielding (position, index) pairs, for datasets that seed each sample by its position."""

    def __init__(self, step_sampler: StepSampler) -> None:
        self.step_sampler = step_sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.step_sampler.iter_positions()
