"""Rules of the training recipe's helpers, one test each (issue 26 point 9): the steps an epoch takes, the
empty-dataset refusal, the collapse threshold, the replica's depth and lr, and the batched photometric draws and
solarisation. Each test was checked against the one-line bug it names."""

from __future__ import annotations

import math

import pytest
import torch

import pretrain.run_length as run_length
from dinoforge.config import load_config
from dinoforge.data.errors import DatasetError
from pretrain.data.multicrop import MultiCropAugmentation, MultiCropConfig
from pretrain.data.photometric import (
    BRIGHTNESS,
    CONTRAST,
    GRAYSCALE,
    HUE,
    JITTER,
    N_PARAMS,
    SATURATION,
    SOLARIZE,
    apply_photometric,
    blur_kernel_size,
    draw_photometric,
)
from pretrain.recipe_shrink import shrink_recipe
from pretrain.signal_watch import COLLAPSE_FRACTION, SignalWatch
from pretrain.train_config import TrainConfig


def config(**overrides: object) -> TrainConfig:
    values = {"data.dataset": "images", "total_steps": 1000, **overrides}
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in values.items()])


@pytest.mark.parametrize("accumulation,world,steps", [(1, 1, 100), (5, 1, 20), (5, 2, 10), (3, 1, 34)])
def test_an_epoch_takes_images_over_the_global_batch_with_accumulation(monkeypatch, accumulation, world, steps):
    """Bug caught: `optim.accumulation_steps` left out of the global batch, so an epoch takes `accumulation` times
    too many steps."""
    monkeypatch.setattr(run_length, "dataset_size", lambda spec, streaming: 1000)
    cfg = config(epochs=1, **{"data.batch_size_per_rank": 10, "optim.accumulation_steps": accumulation})
    assert run_length.resolve_epochs(cfg, world).total_steps == steps == math.ceil(1000 / (10 * world * accumulation))


@pytest.mark.parametrize("images", [0, 1])
def test_an_empty_dataset_is_refused_and_one_image_is_not(monkeypatch, images):
    """Bug caught: an empty dataset accepted (a run of max(1, 0) = 1 step that never sees an image)."""
    monkeypatch.setattr(run_length, "dataset_size", lambda spec, streaming: images)
    cfg = config(epochs=2)
    if images:
        assert run_length.resolve_epochs(cfg, 1).total_steps == 1
    else:
        with pytest.raises(DatasetError, match="no images"):
            run_length.resolve_epochs(cfg, 1)


@pytest.mark.parametrize("prototypes,rows", [(65536, 64), (64, 4096), (4096, 256)])
def test_collapse_is_judged_against_log_of_min_prototypes_rows(prototypes, rows):
    """Bug caught: the threshold taken from log K (or log rows) instead of log(min(K, rows)): with K far above the
    rows, a healthy batch reads as collapsed; with K below, a collapse goes unseen."""
    spread = math.log(min(prototypes, rows))
    healthy = SignalWatch(prototypes, rows, after_step=0)
    assert healthy.check(0, teacher_entropy=0.1, teacher_mean_entropy=1.02 * COLLAPSE_FRACTION * spread) == []
    collapsed = SignalWatch(prototypes, rows, after_step=0)
    problems = collapsed.check(0, teacher_entropy=0.1, teacher_mean_entropy=0.98 * COLLAPSE_FRACTION * spread)
    assert [p.shape for p in problems] == ["collapse"]


@pytest.mark.parametrize("arch,depth,replica_depth", [
    ("vit_small", 0, 4), ("vit_base", 0, 4), ("vit_large", 0, 8), ("vit_giant2", 0, 8),
    ("vit_large", 12, 4), ("vit_base", 13, 8), ("vit_small", 6, 4),
])
def test_replica_depth_is_4_up_to_12_blocks_else_8(arch, depth, replica_depth):
    """Bug caught: the depth rule's bound moved (12-block recipes given 8 blocks, or 24 given 4)."""
    small = shrink_recipe(config(**{"model.arch": arch, "model.depth": depth}))
    assert small.model.depth == replica_depth and small.model.arch == "vit_tiny"


@pytest.mark.parametrize("arch,width", [("vit_small", 384), ("vit_base", 768), ("vit_large", 1024),
                                        ("vit_giant2", 1536), ("vit_tiny", 192)])
def test_replica_lr_is_base_lr_times_recipe_width_over_replica_width(arch, width):
    """Bug caught: the width ratio turned over (or taken from the replica twice)."""
    small = shrink_recipe(config(**{"model.arch": arch, "optim.base_lr": 0.001}))
    assert small.optim.base_lr == pytest.approx(0.001 * width / 192)


def test_hue_shifts_are_drawn_from_minus_to_plus_hue_max():
    """Bug caught: hue drawn from [0, h] (every shift one way round the colour circle) instead of [-h, h]."""
    torch.manual_seed(0)
    hues = torch.stack([draw_photometric(0.5, (0.1, 2.0), True, 1.0, 0.1, 0.2) for _ in range(2000)])[:, HUE]
    assert hues.min() >= -0.1 and hues.max() <= 0.1
    assert hues.min() < -0.09 and hues.max() > 0.09 and abs(hues.mean()) < 0.01


def test_solarize_inverts_from_128_of_255_in_both_paths():
    """Bug caught: the threshold moved (127, 129, or `>` for `>=`): pixel 128 must invert, 127 must not."""
    crops = torch.tensor([126, 127, 128, 129, 255], dtype=torch.uint8).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    params = torch.zeros(1, N_PARAMS)
    params[:, SOLARIZE] = 1.0
    out = apply_photometric(crops.contiguous(), params, mean=(0.0,) * 3, std=(1.0,) * 3, kernel_size=1)
    expected = torch.tensor([126, 127, 255 - 128, 255 - 129, 0], dtype=torch.float32) / 255
    torch.testing.assert_close(out[0, 0, 0], expected)
    assert MultiCropAugmentation(MultiCropConfig()).solarize.threshold == 128  # the per-image (PIL) path


def draws(n: int = 2000, **kwargs: object) -> torch.Tensor:
    """`n` parameter rows of one crop kind, from a fixed seed."""
    args = {"blur_p": 0.5, "sigma": (0.1, 2.0), "solarize": True, "jitter_p": 0.8, "hue_max": 0.1, "grayscale_p": 0.2,
            **kwargs}
    torch.manual_seed(0)
    return torch.stack([draw_photometric(**args) for _ in range(n)])


@pytest.mark.parametrize("column,low,high", [(BRIGHTNESS, 0.6, 1.4), (CONTRAST, 0.6, 1.4), (SATURATION, 0.8, 1.2)])
def test_jitter_factors_span_dinov2s_ranges(column, low, high):
    """Bug caught: a range widened or narrowed (saturation 0.2 taken for 0.4, like brightness and contrast)."""
    values = draws()[:, column]
    assert values.min() >= low and values.max() <= high
    assert values.min() < low + 0.02 * (high - low) and values.max() > high - 0.02 * (high - low)


@pytest.mark.parametrize("column,kwargs,rate", [
    (GRAYSCALE, {"grayscale_p": 0.2}, 0.2), (GRAYSCALE, {"grayscale_p": 0.0}, 0.0),
    (SOLARIZE, {"solarize": True}, 0.2), (SOLARIZE, {"solarize": False}, 0.0), (JITTER, {"jitter_p": 0.8}, 0.8),
])
def test_grayscale_solarize_and_jitter_happen_at_their_probabilities(column, kwargs, rate):
    """Bug caught: a comparison turned (grayscale on 80% of crops), or solarize on every second global crop."""
    assert draws(**kwargs)[:, column].mean().item() == pytest.approx(rate, abs=0.03)


@pytest.mark.parametrize("sigma,size", [(2.0, 9), (1.0, 5), (0.5, 3), (0.42, 3)])
def test_blur_kernel_spans_two_sigma_each_side(sigma, size):
    """Bug caught: a kernel of +-1 sigma (5 px for the paper's 2 px sigma, cutting its tails)."""
    assert blur_kernel_size(sigma) == size
