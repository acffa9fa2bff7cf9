"""Why DINOv2-style targets can carry no signal (dinov2 issue 143), shown on the real model and Sinkhorn-Knopp:

1. LayerScale 1e-5 mutes every block at init: all images share one [CLS] token, and Sinkhorn-Knopp turns identical
   teacher rows into exactly uniform targets, at any temperature.
2. A fresh DINO head's cosine logits spread only ~1/sqrt(bottleneck): at a teacher temperature of 0.04-0.07 a row
   sits just below log K, whatever K.
3. With more prototypes K than teacher rows B, Sinkhorn-Knopp rows cannot be sharper than log(K / B).
`pretrain.signal_watch` warns when a run shows the result (uniform or collapsed targets)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinoforge.config import load_config
from dinoforge.models.config import ModelConfig
from pretrain.losses import sinkhorn_knopp
from pretrain.meta_arch import HeadConfig, LossConfig, SSLMetaArch
from pretrain.recipe_shrink import shrink_recipe
from pretrain.train_config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def smooth_images(n: int = 32, size: int = 32) -> torch.Tensor:
    """Different, image-like inputs: upsampled random 4x4 fields."""
    low = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def entropy_fraction(targets: torch.Tensor) -> float:
    """Mean row entropy of `targets` as a fraction of log K."""
    rows = -(targets * targets.clamp_min(1e-30).log()).sum(-1)
    return rows.mean().item() / math.log(targets.shape[-1])


def init_cls_and_targets(layerscale: float, prototypes: int = 256, temperature: float = 0.04):
    """Mean cosine between the images' teacher [CLS] tokens, and the entropy fraction of their SK targets, at init."""
    torch.manual_seed(0)
    meta = SSLMetaArch(ModelConfig(arch="vit_tiny", depth=4, patch_size=8, img_size=32, layerscale=layerscale),
                       LossConfig(dino_head=HeadConfig(out_dim=prototypes, hidden_dim=512, bottleneck_dim=256)))
    with torch.no_grad():
        cls = meta.teacher["backbone"](smooth_images(), is_training=True)["x_norm_clstoken"]
        targets = sinkhorn_knopp(meta.teacher["dino_head"](cls), temperature)
    unit = F.normalize(cls, dim=-1)
    cosine = (unit @ unit.T)[~torch.eye(len(cls), dtype=torch.bool)].mean().item()
    return cosine, entropy_fraction(targets)


def test_layerscale_1e5_gives_every_image_one_cls_token_and_uniform_targets(one_thread):
    cosine, fraction = init_cls_and_targets(1e-5)
    assert cosine > 1 - 1e-6 and abs(fraction - 1) < 1e-4
    cosine, fraction = init_cls_and_targets(0.1)  # CaiT's init for <= 18 blocks: images differ, targets are not flat
    assert cosine < 0.99 and fraction < 1 - 1e-3


def test_identical_teacher_rows_give_uniform_targets_at_any_temperature():
    logits = torch.randn(1, 512).expand(64, 512).contiguous()
    for temperature in (0.07, 0.04, 0.01, 0.001):
        targets = sinkhorn_knopp(logits, temperature)
        torch.testing.assert_close(targets, torch.full_like(targets, 1 / 512), atol=1e-6, rtol=0)


def test_fresh_head_logits_spread_one_over_sqrt_bottleneck():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(64, 256), dim=-1)
    prototypes = F.normalize(torch.randn(4096, 256), dim=-1)
    spread = (features @ prototypes.T).std().item()
    assert abs(spread - 1 / 16) < 0.005
    # a row of Gaussian logits of std s at temperature T: entropy ~ log K - (s/T)^2 / 2, i.e. only 1.2 nats (T=0.04)
    # or 0.4 nats (T=0.07) below log K for a 256-wide bottleneck, whatever K
    for temperature, drop in ((0.04, 1.2), (0.07, 0.4)):
        row = torch.softmax((features @ prototypes.T) / temperature, dim=-1)
        measured = math.log(4096) - (-(row * row.log()).sum(-1).mean().item())
        assert abs(measured - drop) < 0.25 * drop + 0.05


def test_more_prototypes_than_rows_bounds_the_row_entropy_below_by_log_k_over_b():
    rows, prototypes = 16, 1024
    logits = torch.randn(rows, prototypes, generator=torch.Generator().manual_seed(0))
    targets = sinkhorn_knopp(logits, 0.05, n_iterations=50)
    entropy = -(targets * targets.clamp_min(1e-30).log()).sum(-1)
    assert (entropy >= math.log(prototypes / rows) - 1e-2).all()


GPU_RECIPES = {"vits14": 1024, "vitb14": 1024, "vitl14": 1024, "vitg14": 1024, "gpu_small": 256}  # global batch


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_shipped_recipes_start_with_targets_that_carry_signal(name, one_thread):
    """Each GPU recipe, shrunk by its rule, gives different images different [CLS] tokens and starts its teacher's
    Sinkhorn-Knopp targets clearly below log K. DINOv2's values fail both: LayerScale 1e-5 gives cosine 1 and exactly
    log K; with LayerScale 0.1 its starting temperature 0.04 still gives 0.994 log K on these images (0.02: 0.979)."""
    cfg = shrink_recipe(load_config(TrainConfig, CONFIGS / f"{name}.yaml", ["data.dataset=x"]),
                        recipe_batch=GPU_RECIPES[name])
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg.model, cfg.loss)
    with torch.no_grad():
        cls = meta.teacher["backbone"](smooth_images(64, cfg.model.img_size), is_training=True)["x_norm_clstoken"]
        targets = sinkhorn_knopp(meta.teacher["dino_head"](cls), cfg.optim.warmup_teacher_temp)
    unit = F.normalize(cls, dim=-1)
    assert (unit @ unit.T)[~torch.eye(len(cls), dtype=torch.bool)].mean() < 0.99
    assert entropy_fraction(targets) < 0.985
