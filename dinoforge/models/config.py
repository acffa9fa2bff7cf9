"""The one backbone config every stage builds its ViT from (training, evaluation, curation embedding, exports)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dinoforge.models.vision_transformer import build_vit


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
    layerscale: float = 1e-5
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
    depth = {"depth": cfg.depth} if cfg.depth else {}
    return build_vit(
        cfg.arch, patch_size=cfg.patch_size, img_size=cfg.img_size, num_register_tokens=cfg.num_register_tokens,
        drop_path_rate=cfg.drop_path_rate if drop_path else 0.0, drop_path_uniform=cfg.drop_path_uniform,
        init_values=cfg.layerscale, ffn_layer=cfg.ffn_layer, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
        ffn_bias=cfg.ffn_bias, interpolate_antialias=cfg.interpolate_antialias,
        interpolate_offset=cfg.interpolate_offset, attn_backend=cfg.attn_backend,
        efficient_drop_path=cfg.efficient_drop_path, **depth,
    )
