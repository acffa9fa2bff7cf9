"""A recipe shrunk to a replica that trains in minutes on a CPU, to check that the recipe learns from its first steps.

Kept from the recipe, so that the replica tests the recipe and not another one: LayerScale init, drop path, FFN,
centering, student and teacher temperatures, the heads' hidden and bottleneck widths (the bottleneck sets the initial
logit spread), a separate iBOT head, the local crop count, weight decay, layer-wise decay, clipping, the lr scaling
rule and the shape of every schedule.

Scaled:
- model: ViT-Ti width, depth 4 (8 for recipes deeper than 12 blocks), patch 8 at 48 px global / 24 px local crops;
- blur: its sigma range (pixels) by the crop size, 48 / the recipe's global crop size, so that a blurred 48 px crop
  loses the share of detail the recipe's crop loses (the paper's 2 px at 224 would be 9 px at 224 on a 48 px crop);
- batch: `batch` images; prototypes K scaled with it, so that prototypes per teacher row stay as at the recipe's
  global batch (`recipe_batch`, the base_lr anchor of 1024 images): Sinkhorn-Knopp rows cannot be sharper than
  log(K / rows), so this keeps that floor;
- run: `steps` steps, with the lr warm-up, the last-layer freeze and the teacher-temperature warm-up at the same
  fractions of the run;
- teacher momentum: the EMA's horizon 1 / (1 - m) at the same fraction of the run, floored at `min_momentum`. Keeping
  0.992 literally is not faithful: its 125-step horizon is a whole 150-step replica, whose teacher then barely moves;
- peak lr: base_lr x recipe width / replica width (Adam's lr on hidden matrices scales as 1 / fan-in).
"""

from __future__ import annotations

import copy

from pretrain.run_length import scale_schedule
from pretrain.train_config import TrainConfig

WIDTHS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768, "vit_large": 1024, "vit_giant2": 1536}
DEPTHS = {"vit_tiny": 12, "vit_small": 12, "vit_base": 12, "vit_large": 24, "vit_giant2": 40}
REPLICA_ARCH = "vit_tiny"


def shrink_recipe(cfg: TrainConfig, steps: int = 150, batch: int = 32, recipe_batch: int = 1024,
                  min_momentum: float = 0.9) -> TrainConfig:
    """A shrunk copy of `cfg` by the module's rule; `cfg` is left as it is."""
    out = copy.deepcopy(cfg)
    model, loss, crops = out.model, out.loss, out.data.multicrop
    fraction = steps / cfg.total_steps
    depth = cfg.model.depth or DEPTHS[cfg.model.arch]
    model.arch, model.depth, model.patch_size, model.img_size = REPLICA_ARCH, 4 if depth <= 12 else 8, 8, 48
    crops.blur_sigma = tuple(sigma * 48 / crops.global_crops_size for sigma in crops.blur_sigma)
    crops.global_crops_size, crops.local_crops_size = 48, 24
    out.data.batch_size_per_rank, out.total_steps, out.epochs = batch, steps, 0.0
    out.precision, out.activation_checkpointing, out.compile, out.checkpoint_every = "fp32", False, False, 0
    for head in {id(h): h for h in (loss.dino_head, loss.ibot_head)}.values():
        head.out_dim = max(1, round(head.out_dim * batch / recipe_batch))
    out.optim = optim = scale_schedule(cfg.optim, fraction)
    optim.base_lr = cfg.optim.base_lr * WIDTHS[cfg.model.arch] / WIDTHS[REPLICA_ARCH]
    optim.momentum_teacher = max(min_momentum, 1.0 - (1.0 - cfg.optim.momentum_teacher) / fraction)
    return out
