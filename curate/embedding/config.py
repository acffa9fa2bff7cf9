"""Which embedding a curation run computes; torch-free, so that a curation config loads (and ingest runs) without
torch."""

from __future__ import annotations

from dataclasses import dataclass

from dinoforge.models.config import PretrainedModelConfig

KINDS = ("dinov2", "open_clip", "random_vit", "copydetect")


@dataclass
class EmbedConfig(PretrainedModelConfig):
    """Which embedding the curation run computes (one folder per embedder under embeddings/).

    For the ViT kinds (dinov2, random_vit) the architecture fields and their defaults are the training schema's
    (`dinoforge.models.config.ModelConfig`: arch, patch_size, num_register_tokens, ffn_layer, layerscale,
    interpolate_*); the position grid is built at `image_size` (loaded weights are interpolated to it once), so
    `img_size` is not read.
    """

    kind: str = "copydetect"  # dinov2 | open_clip | random_vit | copydetect
    weights: str = ""  # dinov2: a pretrain run directory, or a checkpoint / release / official weights file
    layerscale: float | None = 1.0  # random_vit: a usable baseline (see dinoforge.models.config)
    open_clip_model: str = "ViT-B-32"  # open_clip: architecture name
    open_clip_pretrained: str = ""  # open_clip: local weights file
    image_size: int = 224  # network input side (resize shorter side, centre crop)
    batch_size: int = 64
    num_workers: int = 4  # decoding threads; 0 decodes in the calling thread
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"embed.kind={self.kind!r}: use one of {', '.join(KINDS)}")
        if self.batch_size < 1 or self.num_workers < 0 or self.image_size < 16:
            raise ValueError("embed.batch_size must be >= 1, embed.num_workers >= 0 and embed.image_size >= 16")
