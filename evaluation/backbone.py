"""The backbone under evaluation, from a config: one place that learns new kinds of `weights` sources."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from dinoforge.config import ConfigError
from dinoforge.hashing import file_sha256
from evaluation.config import BackboneConfig

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """A ViT of `cfg.arch` with `cfg.weights` loaded strictly (or a seeded random init), in eval mode."""
    from dinoforge.models import build_vit

    if _is_run_directory(cfg.weights):
        from dinoforge.models.export_reader import load_exported_backbone

        logger.info("built the teacher backbone of pretrain run %s", cfg.weights)
        return load_exported_backbone(cfg.weights)
    kwargs = {
        "patch_size": cfg.patch_size,
        "img_size": cfg.img_size,
        "num_register_tokens": cfg.num_register_tokens,
        "init_values": cfg.init_values,
        "ffn_layer": cfg.ffn_layer,
        "interpolate_antialias": cfg.interpolate_antialias,
        "interpolate_offset": cfg.interpolate_offset,
        **({"depth": cfg.depth} if cfg.depth else {}),
    }
    if cfg.weights == RANDOM_WEIGHTS:
        # fork_rng: a random-init backbone depends on cfg.seed only, and the caller's RNG stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_vit(cfg.arch, **kwargs)
        logger.info("built %s with random weights (seed %d)", cfg.arch, cfg.seed)
    else:
        path = _weights_path(cfg.weights)
        from dinoforge.models import load_pretrained

        model = build_vit(cfg.arch, **kwargs)
        # A training checkpoint also holds DINO/iBOT heads; evaluation reads the backbone alone.
        load_pretrained(model, path, ignore_heads=True)
        logger.info("built %s with weights %s", cfg.arch, path)
    return model.eval()


def weights_fingerprint(cfg: BackboneConfig) -> str:
    """Identifies the backbone's parameters: sha256 of the weights file, or the random-init recipe."""
    if _is_run_directory(cfg.weights):
        from dinoforge.models.export_reader import BACKBONE_FILE, find_export

        return "sha256:" + file_sha256(find_export(cfg.weights) / BACKBONE_FILE)
    if cfg.weights == RANDOM_WEIGHTS:
        recipe = {k: v for k, v in asdict(cfg).items() if k != "weights"}
        return "random:" + hashlib.sha256(repr(sorted(recipe.items())).encode()).hexdigest()[:16]
    return "sha256:" + file_sha256(_weights_path(cfg.weights))


def _is_run_directory(weights: str) -> bool:
    """A pretrain run or export directory: its model.json sets the architecture, the config's fields are unused."""
    return weights != RANDOM_WEIGHTS and bool(weights) and Path(weights).expanduser().is_dir()


def _weights_path(weights: str) -> Path:
    if not weights:
        raise ConfigError("model.weights is empty: pass --weights PATH (a .pth/.safetensors file) or --weights random")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (model.weights / --weights takes a .pth or .safetensors file, "
            f"or '{RANDOM_WEIGHTS}' for a random init)"
        )
    return path
