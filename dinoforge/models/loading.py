"""A backbone from a weights source, for every stage that uses a trained (or random) ViT: a pretrain run, export or
release directory (its own model config sets the architecture), a weights file in any layout `load_pretrained` reads, or
`random` for a seeded random init, or `pixels` for the raw-pixel baseline. One place learns new kinds of sources."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from dinoforge.config import ConfigError
from dinoforge.hashing import file_sha256
from dinoforge.models.config import PretrainedModelConfig, build_backbone
from dinoforge.models.export_reader import load_exported_backbone, read_model_folder
from dinoforge.models.pixel_baseline import PIXELS_WEIGHTS, pixel_baseline, pixel_fingerprint
from dinoforge.models.weights import load_pretrained

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"


def is_run_directory(weights: str) -> bool:
    """A pretrain run, export or release directory: its own model config sets the architecture, the config's fields
    are unused."""
    return weights not in (RANDOM_WEIGHTS, PIXELS_WEIGHTS) and bool(weights) and Path(weights).expanduser().is_dir()


def weights_file(weights: str, key: str = "model.weights") -> Path:
    """The weights file named by `weights`, or an error saying what `key` takes."""
    if not weights:
        raise ConfigError(f"{key} is empty: give a .pth/.safetensors file, a pretrain run directory, or "
                          f"'{RANDOM_WEIGHTS}'")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} ({key} takes a .pth or .safetensors file, a "
                                f"pretrain run directory, '{RANDOM_WEIGHTS}' for a random init or "
                                f"'{PIXELS_WEIGHTS}' for raw pixels)")
    return path


def load_backbone(cfg: PretrainedModelConfig, key: str = "model.weights",
                  interpolate_pos_embed: bool = False) -> nn.Module:
    """The ViT of `cfg` with `cfg.weights` loaded strictly (a training checkpoint's heads are ignored), in eval mode;
    `key` names the setting in errors.

    `interpolate_pos_embed` resizes a file's position grid to `cfg.img_size` (official weights carry 518 px)."""
    weights, seed = cfg.weights, cfg.seed
    if weights == PIXELS_WEIGHTS:
        logger.info("raw-pixel baseline: no network, the image averaged down to a grid")
        return pixel_baseline()
    if is_run_directory(weights):
        logger.info("built the backbone of %s", weights)
        return load_exported_backbone(weights)
    if weights == RANDOM_WEIGHTS:
        # fork_rng: a random-init backbone depends on `seed` only, and the caller's RNG stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_backbone(cfg, drop_path=False)
        logger.info("built %s with random weights (seed %d)", cfg.arch, seed)
        return model.eval()
    path = weights_file(weights, key)
    model = build_backbone(cfg, drop_path=False)
    load_pretrained(model, path, ignore_heads=True, interpolate_pos_embed=interpolate_pos_embed)
    logger.info("built %s with weights %s", cfg.arch, path)
    return model.eval()


def weights_fingerprint(cfg: PretrainedModelConfig, key: str = "model.weights") -> str:
    """Identifies a backbone's parameters: sha256 of the weights file, the random-init recipe, or the pixel grid."""
    if cfg.weights == PIXELS_WEIGHTS:
        return pixel_fingerprint()
    if is_run_directory(cfg.weights):
        return "sha256:" + file_sha256(read_model_folder(cfg.weights, verify=False).backbone)
    if cfg.weights == RANDOM_WEIGHTS:
        recipe = {k: v for k, v in asdict(cfg).items() if k != "weights"}
        return "random:" + hashlib.sha256(repr(sorted(recipe.items())).encode()).hexdigest()[:16]
    return "sha256:" + file_sha256(weights_file(cfg.weights, key))
