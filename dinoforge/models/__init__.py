"""Model code only: the DINOv2 ViT family, its building blocks, heads, weight interchange and FLOP counting.

Names are imported on first use (PEP 562), so that `dinoforge.models.config` (the model schema) loads without torch:
curation reads its config in torch-free ingest workers.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "ARCHITECTURES": "dinoforge.models.vision_transformer",
    "CheckpointError": "dinoforge.errors",
    "CheckpointMismatchError": "dinoforge.errors",
    "DINOHead": "dinoforge.models.heads",
    "DinoVisionTransformer": "dinoforge.models.vision_transformer",
    "LoadResult": "dinoforge.models.weights",
    "build_vit": "dinoforge.models.vision_transformer",
    "count_forward_flops": "dinoforge.models.flops",
    "export_official": "dinoforge.models.weights",
    "load_heads": "dinoforge.models.weights",
    "load_pretrained": "dinoforge.models.weights",
    "load_release": "dinoforge.models.release_format",
    "save_safetensors": "dinoforge.models.weights",
    "train_step_flops": "dinoforge.models.flops",
    "vit_base": "dinoforge.models.vision_transformer",
    "vit_forward_flops_analytic": "dinoforge.models.flops",
    "vit_giant2": "dinoforge.models.vision_transformer",
    "vit_large": "dinoforge.models.vision_transformer",
    "vit_small": "dinoforge.models.vision_transformer",
    "vit_tiny": "dinoforge.models.vision_transformer",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
