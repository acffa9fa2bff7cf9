"""Linear probe on synthetic features: separable data is learned, the head is chosen on the train holdout only."""

from __future__ import annotations

import pytest
import torch
from test_eval_support import one_torch_thread

from evaluation.config import LinearConfig
from evaluation.feature_set import FeatureSet
from evaluation.holdout import stratified_holdout
from evaluation.linear import HeadSpec, evaluate_heads, head_grid, linear_input, linear_probe, train_heads

NUM_CLASSES, DIM, BLOCKS = 5, 12, 4


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def separable(n: int, seed: int, informative_block: int = -1) -> FeatureSet:
    """Labels = argmax of a fixed linear map of one block's CLS token (with a margin); other tokens are noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(99))
    block_cls = torch.randn(n, BLOCKS, DIM, generator=g)
    logits = block_cls[:, informative_block] @ w.T
    labels = logits.argmax(dim=1)
    # Push every point away from the decision boundaries: separable with a margin, not just separable.
    block_cls[:, informative_block] += 0.5 * w[labels]
    return FeatureSet(labels=labels, block_cls=block_cls, patch_mean=torch.randn(n, DIM, generator=g))


SMALL_GRID = LinearConfig(learning_rates=[1e-3, 1e-1, 1.0], n_last_blocks=[1, 4], avgpool=[False, True], epochs=10,
                          batch_size=100)


def test_grid_is_lrs_x_blocks_x_avgpool_with_matching_inputs():
    specs = head_grid(LinearConfig())
    assert len(specs) == 13 * 2 * 2
    fs = separable(8, 0)
    x = linear_input(fs, HeadSpec(0.1, 4, True))
    assert x.shape == (8, 5 * DIM) and x.shape[1] == HeadSpec(0.1, 4, True).in_features(DIM)
    torch.testing.assert_close(x[:, :DIM], fs.block_cls[:, 0])  # oldest of the last 4 blocks first
    torch.testing.assert_close(x[:, -DIM:], fs.patch_mean)
    torch.testing.assert_close(linear_input(fs, HeadSpec(0.1, 1, False)), fs.block_cls[:, -1])


def test_linear_probe_reaches_99_percent_on_separable_features():
    result = linear_probe(separable(500, 0), separable(300, 1), NUM_CLASSES, SMALL_GRID, seed=0)
    assert result["metrics"]["top1"] >= 99.0
    assert len(result["grid"]) == 12 and sum(row["chosen"] for row in result["grid"]) == 1
    split = result["split"]
    assert split["fit"] + split["holdout"] == 500 and 45 <= split["holdout"] <= 55 and split["val"] == 300


def test_head_is_chosen_on_the_holdout_never_on_val():
    """The information sits in the second-to-last block, so only 4-block heads can learn it; the chosen head is
    the holdout's best, and scrambling the val labels changes the reported accuracy but not the choice."""
    train, val = separable(500, 0, informative_block=-2), separable(300, 1, informative_block=-2)
    result = linear_probe(train, val, NUM_CLASSES, SMALL_GRID, seed=3)
    holdout_top1 = {row["head"]: row["holdout_top1"] for row in result["grid"]}
    assert result["chosen"]["holdout_top1"] == max(holdout_top1.values())
    assert result["chosen"]["n_blocks"] == 4
    assert result["metrics"]["top1"] >= 95.0

    scrambled = FeatureSet(val.labels[torch.randperm(300, generator=torch.Generator().manual_seed(0))],
                           val.block_cls, val.patch_mean)
    again = linear_probe(train, scrambled, NUM_CLASSES, SMALL_GRID, seed=3)
    assert again["chosen"] == result["chosen"] and again["grid"] == result["grid"]
    assert again["metrics"]["top1"] < 50.0


def test_same_seed_same_numbers_other_seed_other_numbers():
    train, val = separable(300, 0), separable(100, 1)
    cfg = LinearConfig(learning_rates=[1e-2], n_last_blocks=[1], avgpool=[False], epochs=2, batch_size=32)
    a = linear_probe(train, val, NUM_CLASSES, cfg, seed=0)
    b = linear_probe(train, val, NUM_CLASSES, cfg, seed=0)
    c = linear_probe(train, val, NUM_CLASSES, cfg, seed=1)
    assert a == b
    assert a["grid"][0]["holdout_loss"] != c["grid"][0]["holdout_loss"]


def test_heads_train_together_as_if_alone():
    """Summing the heads' losses into one backward keeps their gradients separate: a head trained in the grid
    equals the same head trained alone (same seed, so the same batches and init)."""
    fs = separable(200, 0)
    cfg = LinearConfig(epochs=2, batch_size=50)
    spec = HeadSpec(0.05, 1, False)
    alone = train_heads([spec], fs, NUM_CLASSES, cfg, seed=7, device=torch.device("cpu"))[0]
    # Same init draws for the first head, so it must come first in the list.
    together = train_heads([spec, HeadSpec(0.5, 4, True)], fs, NUM_CLASSES, cfg, seed=7,
                           device=torch.device("cpu"))[0]
    torch.testing.assert_close(together.weight, alone.weight)
    scores = evaluate_heads([spec], [alone], fs, torch.device("cpu"))[0]
    assert set(scores) == {"top1", "top5", "loss"}


def test_stratified_holdout_covers_every_sample_once_and_every_class():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 1 + [3] * 2)
    fit, holdout = stratified_holdout(labels, 0.1, seed=0)
    assert sorted(torch.cat([fit, holdout]).tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[holdout], minlength=4).tolist() == [5, 2, 0, 1]
    assert set(labels[fit].tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="holdout_fraction"):
        stratified_holdout(labels, 0.0, seed=0)
    with pytest.raises(ValueError, match="holdout of 3 train samples is empty"):
        stratified_holdout(torch.tensor([0, 1, 2]), 0.1, seed=0)
