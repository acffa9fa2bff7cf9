"""torch.hub entrypoints: the DINOv2 backbones under their official names, built with the official arguments.

    model = torch.hub.load("path/to/dinoforge", "dinov2_vits14_reg", source="local", weights="backbone.safetensors")

`weights` is a local file in any layout `load_pretrained` reads (official hub .pth, DINOv2 training checkpoint, timm,
Hugging Face, our safetensors export), or a release folder (`python -m pretrain release`: its config.json builds the
model, after its files are checked against SHA256SUMS); without it the model is randomly initialised. Nothing is
ever downloaded. Other keyword arguments go to the model constructor (e.g. img_size=224), as with the official hub.

    model = torch.hub.load("path/to/dinoforge", "release", source="local", weights="path/to/release")  # any release
"""

from __future__ import annotations

import os
from pathlib import Path

from dinoforge.models.release_format import is_release, load_release, release_model_config
from dinoforge.models.vision_transformer import DinoVisionTransformer, build_vit
from dinoforge.models.weights import load_pretrained

dependencies = ["torch"]

# facebookresearch/dinov2 hub/backbones.py: every backbone is built with these; register variants change the
# interpolation of position embeddings (antialiased, no legacy offset) along with the 4 registers.
_OFFICIAL_ARGS = {"patch_size": 14, "img_size": 518, "init_values": 1.0}
_REGISTER_ARGS = {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0}


def _backbone(arch: str, registers: bool, weights: str | os.PathLike | None, pretrained: bool,
              ignore_heads: bool, **kwargs) -> DinoVisionTransformer:
    if weights is not None and Path(weights).is_dir() and is_release(weights):
        return _official_release(arch, registers, weights, kwargs)
    if pretrained and weights is None:
        raise ValueError("this hub never downloads weights: pass weights=<local checkpoint path> "
                         "(e.g. a dinov2_*_pretrain.pth you downloaded, or our backbone.safetensors)")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights={str(weights)!r} is not a local file; this hub never downloads, "
                                "pass the path of a checkpoint on disk")
    args = {**_OFFICIAL_ARGS, **(_REGISTER_ARGS if registers else {}), **kwargs}
    if arch == "vit_giant2":
        args.setdefault("ffn_layer", "swiglufused")
    model = build_vit(arch, **args)
    if weights is not None:
        load_pretrained(model, weights, ignore_heads=ignore_heads)
    return model


def _official_release(arch: str, registers: bool, folder, kwargs: dict) -> DinoVisionTransformer:
    """A release under an official entry name: it must hold that architecture (its config.json builds it)."""
    model_cfg = release_model_config(folder)
    wanted = (arch, 14, 4 if registers else 0)
    held = (model_cfg.arch, model_cfg.patch_size, model_cfg.num_register_tokens)
    if held != wanted:
        raise ValueError(f"release {folder} holds {held[0]}/{held[1]} with {held[2]} registers, not this entry's "
                         f"{wanted[0]}/{wanted[1]} with {wanted[2]}: load it with the generic entry "
                         '`torch.hub.load(repo, "release", source="local", weights=...)`')
    if kwargs:
        raise ValueError(f"a release builds its model from its config.json: drop {sorted(kwargs)}")
    return load_release(folder)


def release(*, weights, **kwargs) -> DinoVisionTransformer:
    """Any release folder written by `python -m pretrain release` (checked against its SHA256SUMS), in eval mode."""
    if kwargs:
        raise ValueError(f"a release builds its model from its config.json: drop {sorted(kwargs)}")
    if not is_release(weights):
        raise FileNotFoundError(f"weights={str(weights)!r} is not a release folder (no config.json of format "
                                "dinoforge-release); `python -m pretrain release` writes one")
    return load_release(weights)


def dinov2_vits14(*, weights=None, pretrained: bool = False, ignore_heads: bool = False, **kwargs):
    """DINOv2 ViT-S/14 (21M parameters)."""
    return _backbone("vit_small", False, weights, pretrained, ignore_heads, **kwargs)


def dinov2_vitb14(*, weights=None, pretrained: bool = False, ignore_heads: bool = False, **kwargs):
    """DINOv2 ViT-B/14 (86M parameters)."""
    return _backbone("vit_base", False, weights, pretrained, ignore_heads, **kwargs)


def dinov2_vitl14(*, weights=None, pretrained: bool = False, ignore_heads: bool = False, **kwargs):
    """DINOv2 ViT-L/14 (300M parameters)."""
    return _backbone("vit_large", False, weights, pretrained, ignore_heads, **kwargs)


def dinov2_vitg14(*, weights=None, pretrained: bool = False, ignore_heads: bool = False, **kwargs):
    """DINOv2 ViT-g/14 (1.1B parameters, SwiGLU FFN)."""
    return _backbone("vit_giant2", False, weights, pretrained, ignore_heads, **kwargs)


def dinov2_vits14_reg(*, weights=None, pretrained: bool = False, ignore_heads: bool = False, **kwargs):
    """DINOv2 ViT-S/14 with 4 registers."""
    return _backbone("vit_small", True, weights, pretrained, ignore_heads, **kwargs)


def dinov2_vitb14_reg(*, weights=None, pretrained: bool = False, ignore_heads: bool = False, **kwargs):
    """DINOv2 ViT-B/14 with 4 registers."""
    return _backbone("vit_base", True, weights, pretrained, ignore_heads, **kwargs)


def dinov2_vitl14_reg(*, weights=None, pretrained: bool = False, ignore_heads: bool = False, **kwargs):
    """DINOv2 ViT-L/14 with 4 registers."""
    return _backbone("vit_large", True, weights, pretrained, ignore_heads, **kwargs)


def dinov2_vitg14_reg(*, weights=None, pretrained: bool = False, ignore_heads: bool = False, **kwargs):
    """DINOv2 ViT-g/14 with 4 registers (SwiGLU FFN)."""
    return _backbone("vit_giant2", True, weights, pretrained, ignore_heads, **kwargs)


def dinoforge_vitt14(*, weights=None, pretrained: bool = False, ignore_heads: bool = False, **kwargs):
    """ViT-Ti/14 (5.5M parameters; no official DINOv2 release): the size of our CPU demos and smallest students."""
    return _backbone("vit_tiny", False, weights, pretrained, ignore_heads, **kwargs)


def dinoforge_vitt14_reg(*, weights=None, pretrained: bool = False, ignore_heads: bool = False, **kwargs):
    """ViT-Ti/14 with 4 registers (no official DINOv2 release)."""
    return _backbone("vit_tiny", True, weights, pretrained, ignore_heads, **kwargs)
