"""Which embedding a curation run computes; torch-free, so that a curation config loads (and ingest runs) without
torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dinoforge.models.config import ModelConfig, PretrainedModelConfig

KINDS = ("dinov2", "open_clip", "random_vit", "copydetect")


@dataclass
class EmbedConfig(PretrainedModelConfig):
    """Which embedding the curation run computes (one folder per embedder under embeddings/).

    For the ViT kinds (dinov2, random_vit) the architecture fields and their defaults are the training schema's
    (`dinoforge.models.config.ModelConfig`: arch, patch_size, num_register_tokens, ffn_layer, layerscale,
    interpolate_*); the position grid is built at `embed_image_size` (loaded weights are interpolated to it once), so
    `img_size` is not read.
    """

    kind: str = "copydetect"  # dinov2 | open_clip | random_vit | copydetect
    weights: str = ""  # dinov2: a pretrain run directory, or a checkpoint / release / official weights file
    layerscale: float | None = 1.0  # random_vit: a usable baseline (see dinoforge.models.config)
    open_clip_model: str = "ViT-B-32"  # open_clip: architecture name
    open_clip_pretrained: str = ""  # open_clip: local weights file
    # network input side (resize the shorter side, centre crop); 0: the model's own, see `embed_image_size`
    image_size: int = 0
    batch_size: int = 64
    num_workers: int = 4  # decoding threads; 0 decodes in the calling thread
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"embed.kind={self.kind!r}: use one of {', '.join(KINDS)}")
        if self.batch_size < 1 or self.num_workers < 0 or 0 < self.image_size < 16 or self.image_size < 0:
            raise ValueError("embed.batch_size must be >= 1, embed.num_workers >= 0 and embed.image_size >= 16 "
                             "(or 0: the model's own)")


DEFAULT_IMAGE_SIZE = 224  # official DINOv2 weights' and open_clip's usual input side


def own_model_config(cfg: EmbedConfig) -> ModelConfig | None:
    """The architecture of one of our runs, exports or releases that `dinov2` embeds with (its own model config), or
    None for a weights file, random init or another kind."""
    if cfg.kind != "dinov2" or not cfg.weights or not Path(cfg.weights).expanduser().is_dir():
        return None
    from dinoforge.models.export_reader import exported_model_config  # torch: only for our own model folders

    return exported_model_config(cfg.weights)


def embed_image_size(cfg: EmbedConfig) -> int:
    """The input side an embedder runs at: `image_size` when set; else the side one of our runs, exports or releases
    trained at (a 48 px cpu_tiny embeds at 48, not 224); else DEFAULT_IMAGE_SIZE."""
    if cfg.image_size:
        return cfg.image_size
    own = own_model_config(cfg)
    return own.img_size if own else DEFAULT_IMAGE_SIZE
