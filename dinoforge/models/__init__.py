"""Model code only: the DINOv2 ViT family, its building blocks, heads, weight interchange and FLOP counting."""

from dinoforge.models.flops import count_forward_flops, train_step_flops, vit_forward_flops_analytic
from dinoforge.models.heads import DINOHead
from dinoforge.models.vision_transformer import (
    ARCHITECTURES,
    DinoVisionTransformer,
    build_vit,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)
from dinoforge.models.weights import (
    CheckpointError,
    CheckpointMismatchError,
    LoadResult,
    export_official,
    load_heads,
    load_pretrained,
    save_safetensors,
)

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "CheckpointMismatchError",
    "DINOHead",
    "DinoVisionTransformer",
    "LoadResult",
    "build_vit",
    "count_forward_flops",
    "export_official",
    "load_heads",
    "load_pretrained",
    "save_safetensors",
    "train_step_flops",
    "vit_base",
    "vit_forward_flops_analytic",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
