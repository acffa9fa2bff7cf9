"""The rule that shrinks a recipe to a CPU replica keeps what defines the recipe and scales the rest as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinoforge.config import load_config
from pretrain.recipe_shrink import shrink_recipe
from pretrain.train_config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
GPU_RECIPES = ["vits14", "vitb14", "vitl14", "vitg14"]


def recipe(name: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIGS / f"{name}.yaml", ["data.dataset=x"])


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_shrunk_recipe_keeps_its_definition(name):
    full = recipe(name)
    small = shrink_recipe(full)
    m, s = full.model, small.model
    assert (s.layerscale, s.drop_path_rate, s.drop_path_uniform, s.ffn_layer) == \
        (m.layerscale, m.drop_path_rate, m.drop_path_uniform, m.ffn_layer)
    assert small.loss.centering == full.loss.centering and small.loss.student_temp == full.loss.student_temp
    assert (small.optim.teacher_temp, small.optim.warmup_teacher_temp) == (full.optim.teacher_temp,
                                                                           full.optim.warmup_teacher_temp)
    assert small.loss.dino_head.bottleneck_dim == full.loss.dino_head.bottleneck_dim
    assert small.loss.ibot_separate_head == full.loss.ibot_separate_head
    assert small.data.multicrop.local_crops_number == full.data.multicrop.local_crops_number
    assert full.model.arch != "vit_tiny" and full.total_steps > 1000  # the recipe itself is untouched


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_shrunk_recipe_scales_prototypes_warmups_and_momentum(name):
    full, small = recipe(name), shrink_recipe(recipe(name))
    # prototypes per teacher row as at the recipe's 1024-image batch (2 global crops per image)
    assert small.loss.dino_head.out_dim / (2 * 32) == pytest.approx(full.loss.dino_head.out_dim / (2 * 1024))
    for key in ("warmup_steps", "freeze_last_layer_steps", "warmup_teacher_temp_steps"):
        assert getattr(small.optim, key) / 150 == pytest.approx(getattr(full.optim, key) / full.total_steps,
                                                                abs=0.5 / 150)
    horizon_fraction = 1 / (1 - full.optim.momentum_teacher) / full.total_steps
    assert small.optim.momentum_teacher == max(0.9, 1 - 1 / (horizon_fraction * 150))
    assert small.total_steps == 150 and small.data.batch_size_per_rank == 32 and small.model.arch == "vit_tiny"
    # the blur's sigma (pixels) keeps its share of the crop
    scale = 48 / full.data.multicrop.global_crops_size
    assert small.data.multicrop.blur_sigma == pytest.approx([s * scale for s in full.data.multicrop.blur_sigma])
