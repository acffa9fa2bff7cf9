"""StepSampler: same global batch for any world size, exact resume, per-epoch permutations, state round trip."""

from __future__ import annotations

from itertools import islice

import pytest

from pretrain.data.samplers import PositionSampler, StepSampler


def rank_steps(n: int, global_batch: int, world: int, steps: int, seed: int = 0, start_step: int = 0) -> list:
    """steps x [global batch as the concatenation of every rank's chunk]."""
    streams = [
        iter(StepSampler(n, global_batch, rank, world, seed=seed, start_step=start_step)) for rank in range(world)
    ]
    local = global_batch // world
    return [[i for s in streams for i in islice(s, local)] for _ in range(steps)]


def test_global_batches_do_not_depend_on_world_size() -> None:
    one = rank_steps(50, 12, 1, steps=10)
    for world in (2, 3, 4, 6):
        assert rank_steps(50, 12, world, steps=10) == one
    sampler = StepSampler(50, 12, 0, 1)
    assert [sampler.global_batch_indices(s) for s in range(10)] == one


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    n = 37
    sampler = StepSampler(n, 8, 0, 1, seed=4)
    stream = list(islice(iter(sampler), 3 * n))
    epochs = [stream[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert stream == [sampler.index_at(p) for p in range(3 * n)]
    assert len(sampler._permutations) <= 2  # old epochs are dropped


def test_start_step_continues_the_stream() -> None:
    for world in (1, 2):
        full = rank_steps(23, 6, world, steps=12, seed=1)
        resumed = rank_steps(23, 6, world, steps=7, seed=1, start_step=5)
        assert resumed == full[5:]
    # and across world sizes: 2 ranks resumed where 1 rank stopped
    assert rank_steps(23, 6, 2, steps=3, seed=1, start_step=4) == rank_steps(23, 6, 1, steps=7, seed=1)[4:]


def test_seed_changes_the_order() -> None:
    assert rank_steps(40, 8, 1, 3, seed=0) != rank_steps(40, 8, 1, 3, seed=1)
    assert rank_steps(40, 8, 1, 3, seed=2) == rank_steps(40, 8, 1, 3, seed=2)


def test_positions_are_contiguous_chunks() -> None:
    sampler = StepSampler(100, 12, 2, 3, start_step=3)
    assert sampler.positions(3) == range(44, 48)
    pairs = list(islice(PositionSampler(sampler), 6))
    assert [p for p, _ in pairs] == [44, 45, 46, 47, 56, 57]
    assert [i for _, i in pairs] == [sampler.index_at(p) for p, _ in pairs]


def test_state_dict_round_trip_and_mismatch() -> None:
    sampler = StepSampler(30, 8, 0, 2, seed=9)
    state = sampler.state_dict(next_step=17)
    assert state == {"seed": 9, "dataset_len": 30, "global_batch": 8, "step": 17}
    other_world = StepSampler(30, 8, 1, 4, seed=9)  # resume on a different number of processes
    other_world.load_state_dict(state)
    assert other_world.start_step == 17
    with pytest.raises(ValueError, match="dataset_len=30"):
        StepSampler(31, 8, 0, 2, seed=9).load_state_dict(state)


def test_bad_arguments_are_explained() -> None:
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        StepSampler(10, 6, 0, 4)
    with pytest.raises(ValueError, match="rank < world"):
        StepSampler(10, 4, 2, 2)
    with pytest.raises(ValueError, match="dataset_len"):
        StepSampler(0, 4, 0, 1)
