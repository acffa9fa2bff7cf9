"""DINOv2 multi-crop augmentation: 2 global crops and N local crops of one image, with the paper's parameters.

Every crop: random resized crop (bicubic) + horizontal flip, colour jitter (brightness 0.4, contrast 0.4,
saturation 0.2, hue 0.1) with p=0.8, grayscale with p=0.2, Gaussian blur (kernel 9, sigma 0.1-2), and for the
second global crop solarisation (threshold 128) with p=0.2; then ImageNet normalisation. The colour values are
defaults: `color_jitter_p`, `color_jitter_hue` and `grayscale_p` weaken them for small, low-resolution data.

`photometric` decides where everything after the crop and flip runs: "per_image" (the reference) in the data workers
on the PIL crop; "batched" on the training device for the whole batch (`pretrain.data.photometric`; the workers' CPU
time 3.8-4.9x lower), the workers returning uint8 crops with each crop's drawn parameters.

The blur is in pixels, so the paper's sigma of up to 2 px is calibrated for 224 px crops; at 48 px the same blur
erases a 4.7x larger share of the image (a 2-px sigma is 9 px at 224). `blur_sigma` sets the range for smaller crops
(`recipe_shrink` scales it with the crop size); the kernel spans +-2 sigma (2 * ceil(2 * max) + 1: 9 for sigma 2).

Blur probabilities, `blur_semantics`:
  - "standard" (the DINOv2 paper, BYOL's asymmetric recipe): global crop 1 always blurred, global crop 2 with
    p=0.1, local crops with p=0.5.
  - "dinov2_legacy": what the reference code actually does. Its `GaussianBlur(p)` subclasses torchvision's
    `RandomApply` with probability `1 - p` (a comment there says torchvision applies `1 - p`, which is not true:
    `RandomApply(p)` applies with probability p). So the released checkpoints were trained with blur probabilities
    0 (global 1), 0.9 (global 2) and 0.5 (locals). Choose it to reproduce those checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from PIL import Image
from torchvision.transforms import v2

from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.data.photometric import (
    BRIGHTNESS_RANGE,
    CONTRAST_RANGE,
    SATURATION_RANGE,
    SOLARIZE_P,
    SOLARIZE_THRESHOLD,
    apply_photometric,
    blur_kernel_size,
    draw_photometric,
)

BLUR_SEMANTICS = ("standard", "dinov2_legacy")
PHOTOMETRIC = ("per_image", "batched")


class BlurProbabilities(NamedTuple):
    """Probability that Gaussian blur is applied to each kind of crop."""

    global1: float
    global2: float
    local: float


def blur_probabilities(blur_semantics: str) -> BlurProbabilities:
    """The blur probabilities of a `blur_semantics` mode (see the module docstring)."""
    paper = BlurProbabilities(global1=1.0, global2=0.1, local=0.5)
    if blur_semantics == "standard":
        return paper
    if blur_semantics == "dinov2_legacy":
        return BlurProbabilities(*(1.0 - p for p in paper))
    raise ValueError(f"blur_semantics must be one of {BLUR_SEMANTICS}, got {blur_semantics!r}")


@dataclass
class MultiCropConfig:
    """Multi-crop parameters (DINOv2 defaults); crop sizes are in pixels, scales are fractions of the image area."""

    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    local_crops_number: int = 8
    global_crops_size: int = 224
    local_crops_size: int = 96
    blur_semantics: str = "standard"  # "standard" | "dinov2_legacy"
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels: the paper's range for 224 px crops
    # Colour: ColorJitter (brightness 0.4, contrast 0.4, saturation 0.2, hue up to `color_jitter_hue`) with probability
    # `color_jitter_p`, grayscale with `grayscale_p`. On small, low-resolution data colour is much of what there is to
    # learn from, and DINOv2's strength removes it (cpu_tiny.yaml).
    color_jitter_p: float = 0.8
    color_jitter_hue: float = 0.1
    grayscale_p: float = 0.2
    photometric: str = "per_image"  # "per_image" (workers, PIL) | "batched" (training device; see module docstring)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        blur_probabilities(self.blur_semantics)  # validates the mode
        for name in ("color_jitter_p", "grayscale_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.color_jitter_hue <= 0.5:
            raise ValueError(f"color_jitter_hue must be in [0, 0.5] (a fraction of the hue circle), got "
                             f"{self.color_jitter_hue}")
        if self.photometric not in PHOTOMETRIC:
            raise ValueError(f"photometric must be one of {PHOTOMETRIC}, got {self.photometric!r}")
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got ({low}, {high})")
        low, high = self.blur_sigma
        if not 0.0 < low <= high:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got ({low}, {high})")
        if self.local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {self.local_crops_number}")
        if self.global_crops_size <= 0 or self.local_crops_size <= 0:
            raise ValueError("global_crops_size and local_crops_size must be positive")


class MultiCropAugmentation:
    """PIL image -> `{"global_crops": [t1, t2], "local_crops": [t, ...]}` of normalised float32 [3, S, S] tensors;
    with `photometric="batched"`, uint8 crops and their parameters in `global_photometric` [2, P] and
    `local_photometric` [n, P], finished on the device by `apply_batch_photometric`.

    Randomness comes from torch's global generator (torchvision transforms draw from it), so
    `torch.manual_seed(s)` before a call makes its output reproducible.
    """

    def __init__(self, cfg: MultiCropConfig | None = None) -> None:
        self.cfg = cfg = cfg or MultiCropConfig()
        blur = blur_probabilities(cfg.blur_semantics)
        sigma = tuple(cfg.blur_sigma)
        self.blur = blur
        self.blur_global1 = _random_blur(blur.global1, sigma)
        self.blur_global2 = _random_blur(blur.global2, sigma)
        self.blur_local = _random_blur(blur.local, sigma)
        self.solarize = v2.RandomSolarize(threshold=round(SOLARIZE_THRESHOLD * 255), p=SOLARIZE_P)
        self.geometric_global = _crop_and_flip(cfg.global_crops_size, cfg.global_crops_scale)
        self.geometric_local = _crop_and_flip(cfg.local_crops_size, cfg.local_crops_scale)
        colour = [
            v2.RandomApply([v2.ColorJitter(brightness=BRIGHTNESS_RANGE, contrast=CONTRAST_RANGE,
                                           saturation=SATURATION_RANGE, hue=cfg.color_jitter_hue)],
                           p=cfg.color_jitter_p),
            v2.RandomGrayscale(p=cfg.grayscale_p),
        ]
        to_tensor = [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
        ]
        # Colour, blur and solarize run on the PIL crop like the reference (PIL's enhancers and 8-bit solarize).
        self.global1 = v2.Compose([*colour, self.blur_global1, *to_tensor])
        self.global2 = v2.Compose([*colour, self.blur_global2, self.solarize, *to_tensor])
        self.local = v2.Compose([*colour, self.blur_local, *to_tensor])

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        if self.cfg.photometric == "batched":
            return self._crops_and_parameters(image)
        global_crops = [
            self.global1(self.geometric_global(image)),
            self.global2(self.geometric_global(image)),
        ]
        local_crops = [self.local(self.geometric_local(image)) for _ in range(self.cfg.local_crops_number)]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def _crops_and_parameters(self, image: Image.Image) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        cfg = self.cfg
        n_local = cfg.local_crops_number
        draw = partial(draw_photometric, sigma=tuple(cfg.blur_sigma), jitter_p=cfg.color_jitter_p,
                       hue_max=cfg.color_jitter_hue, grayscale_p=cfg.grayscale_p)
        crops = [self.geometric_global(image) for _ in range(2)]
        crops += [self.geometric_local(image) for _ in range(n_local)]
        parameters = [draw(self.blur.global1, solarize=False), draw(self.blur.global2, solarize=True)]
        parameters += [draw(self.blur.local, solarize=False) for _ in range(n_local)]
        global_rows, local_rows = torch.stack(parameters).split([2, n_local])
        tensors = [v2.functional.pil_to_tensor(crop) for crop in crops]
        return {"global_crops": tensors[:2], "local_crops": tensors[2:],
                "global_photometric": global_rows, "local_photometric": local_rows}

    def __repr__(self) -> str:
        blur = blur_probabilities(self.cfg.blur_semantics)
        return f"MultiCropAugmentation({self.cfg}, blur p={tuple(blur)})"


def _random_blur(p: float, sigma: tuple[float, float]) -> v2.RandomApply:
    return v2.RandomApply([v2.GaussianBlur(kernel_size=blur_kernel_size(sigma[1]), sigma=sigma)], p=p)


def _crop_and_flip(size: int, scale: tuple[float, float]) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
        ]
    )


def apply_batch_photometric(batch: dict, cfg: MultiCropConfig) -> dict:
    """A collated batch with uint8 crops and their photometric parameters (on the training device) -> the batch with
    normalised float32 crops; a batch whose crops are already finished is returned as it is."""
    if "global_photometric" not in batch:
        return batch
    kernel_size = blur_kernel_size(cfg.blur_sigma[1])
    out = dict(batch)
    for crops, parameters in (("global_crops", "global_photometric"), ("local_crops", "local_photometric")):
        out[crops] = apply_photometric(out[crops], out.pop(parameters), cfg.mean, cfg.std, kernel_size)
    return out
