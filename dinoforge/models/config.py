"""The one backbone config every stage builds its ViT from (training, evaluation, curation embedding, exports).

One schema, DINOv2's training defaults. `layerscale` (LayerScale's gamma at initialisation) is 1e-5 as in DINOv2's
training config; it matters only for a network that starts from random weights, since loaded weights overwrite
gamma. Evaluation's `BackboneConfig` and curation's `EmbedConfig` extend this schema with where the weights come
from (`weights`, `seed`) and change only documented defaults: their random-init baseline (`weights: random`,
`kind: random_vit`) uses LayerScale 1.0, as DINOv2's hub factories do, because with 1e-5 the blocks add almost
nothing to the tokens and the [CLS] output is nearly the same for every image (k-NN top-1 on Imagenette, random
vit_tiny at 112 px: 12% with 1e-5, 26% with 1.0, chance 10%). Weights trained without LayerScale load into
`layerscale: null` (or 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass
class ModelConfig:
    """The backbone; DINOv2's argument names."""

    arch: str = "vit_small"
    depth: int = 0  # 0: the architecture's depth; fewer blocks for small CPU models
    patch_size: int = 14
    img_size: int = 224  # size of the position-embedding grid; other crop sizes are interpolated
    num_register_tokens: int = 0
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    layerscale: float | None = 1e-5  # LayerScale init; null or 0: no LayerScale
    ffn_layer: str = "mlp"
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    attn_backend: str = "auto"
    efficient_drop_path: bool = True
    sequence_packing: bool = True  # one packed pass over global + local crops (off: two passes, for benchmarks)


def build_backbone(cfg: ModelConfig, drop_path: bool = True) -> nn.Module:
    """The ViT of `cfg`; without `drop_path` for the teacher (it never drops blocks)."""
    # imported here: the config itself stays torch-free (curation loads it in torch-free ingest workers)
    from dinoforge.models.vision_transformer import build_vit

    depth = {"depth": cfg.depth} if cfg.depth else {}
    return build_vit(
        cfg.arch, patch_size=cfg.patch_size, img_size=cfg.img_size, num_register_tokens=cfg.num_register_tokens,
        drop_path_rate=cfg.drop_path_rate if drop_path else 0.0, drop_path_uniform=cfg.drop_path_uniform,
        init_values=cfg.layerscale, ffn_layer=cfg.ffn_layer, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
        ffn_bias=cfg.ffn_bias, interpolate_antialias=cfg.interpolate_antialias,
        interpolate_offset=cfg.interpolate_offset, attn_backend=cfg.attn_backend,
        efficient_drop_path=cfg.efficient_drop_path, **depth,
    )


@dataclass
class PretrainedModelConfig(ModelConfig):
    """A backbone and the weights to put in it (evaluation's and curation's models; see dinoforge.models.loading)."""

    # a weights file load_pretrained accepts, a pretrain run or export directory (its model.json then replaces the
    # architecture fields), or "random" for a seeded random init
    weights: str = "random"
    seed: int = 0  # random init only
