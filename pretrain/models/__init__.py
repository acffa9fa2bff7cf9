"""Model code only: the DINOv2 ViT family, its building blocks, heads and weight interchange."""

from pretrain.models.heads import DINOHead
from pretrain.models.vision_transformer import (
    ARCHITECTURES,
    DinoVisionTransformer,
    build_vit,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "DINOHead",
    "ARCHITECTURES",
    "DinoVisionTransformer",
    "build_vit",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
