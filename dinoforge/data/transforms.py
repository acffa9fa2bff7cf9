"""The standard classification eval transform (resize the short side, center crop, to float, normalise), used by
evaluation, the in-training monitor and curation embedding alike; and the ImageNet normalisation every stage uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from dinoforge.data.decode import to_rgb as decoded_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EvalTransformConfig:
    """The standard classification eval transform: resize the short side, center crop, normalise."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bicubic"  # bilinear | bicubic | nearest
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))



INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def make_eval_transform(cfg: EvalTransformConfig) -> v2.Compose:
    """PIL image or uint8 tensor -> normalised float tensor [3, crop, crop]."""
    if cfg.interpolation not in INTERPOLATIONS:
        raise ValueError(f"transform.interpolation={cfg.interpolation!r}; choose one of {sorted(INTERPOLATIONS)}")
    if cfg.crop_size > cfg.resize_size:
        raise ValueError(
            f"transform.crop_size={cfg.crop_size} is larger than transform.resize_size={cfg.resize_size}; "
            "the crop must fit in the resized image"
        )
    if len(cfg.mean) != 3 or len(cfg.std) != 3:
        raise ValueError(f"transform.mean / transform.std need 3 values (RGB), got {cfg.mean} / {cfg.std}")
    return v2.Compose(
        [
            # Greyscale, palette, CMYK and RGBA photos exist in real datasets (Imagenette has 242 greyscale ones).
            v2.Lambda(to_rgb),
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(cfg.resize_size, interpolation=INTERPOLATIONS[cfg.interpolation], antialias=True),
            v2.CenterCrop(cfg.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
        ]
    )


def to_rgb(image: object) -> object:
    """PIL images -> RGB by the one decoder's default policy (as training and curation see them); tensors pass
    through (`v2.RGB` handles 1-channel ones)."""
    if isinstance(image, Image.Image):
        return decoded_rgb(image)
    return image
