"""Multi-crop's photometric augmentation for a whole batch on the training device.

The per-image path (`MultiCropAugmentation` with `photometric="per_image"`) runs colour jitter, grayscale, blur and
solarisation as PIL calls in the data workers: ~27 of the 31 ms an image costs one core for gpu_small's 2 x 112 px +
8 x 48 px crops, so a one-GPU run is bound by its CPU cores long before the GPU. With `photometric="batched"` the
workers only crop and flip (uint8) and draw each crop's photometric parameters from the same per-position seeded
generator; `apply_photometric` then applies them to the stacked batch in a handful of tensor operations.

The operations follow torchvision's tensor functionals (ColorJitter's four adjustments in a random order per crop,
ITU-R 601 grayscale, a Gaussian blur with reflect padding, solarisation at 128/255, normalisation), in float32
without the per-step 8-bit rounding of PIL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# One row of parameters per crop; the columns:
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # the permutation of (brightness, contrast, saturation, hue), as floats
GRAYSCALE, BLUR_SIGMA, SOLARIZE = 9, 10, 11  # BLUR_SIGMA 0: no blur
N_PARAMS = 12

# DINOv2's fixed multi-crop values, shared with the per-image path; the jitter and grayscale probabilities and the hue
# range are MultiCropConfig's (color_jitter_p, grayscale_p, color_jitter_hue)
BRIGHTNESS_RANGE, CONTRAST_RANGE, SATURATION_RANGE = (0.6, 1.4), (0.6, 1.4), (0.8, 1.2)
SOLARIZE_P = 0.2
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255


def draw_photometric(blur_p: float, sigma: tuple[float, float], solarize: bool, jitter_p: float, hue_max: float,
                     grayscale_p: float) -> torch.Tensor:
    """One crop's parameters [N_PARAMS], drawn from torch's global generator (seeded per sample by the caller)."""
    row = torch.zeros(N_PARAMS)
    row[JITTER] = float(torch.rand(()) < jitter_p)
    for column, (low, high) in zip((BRIGHTNESS, CONTRAST, SATURATION, HUE),
                                   (BRIGHTNESS_RANGE, CONTRAST_RANGE, SATURATION_RANGE, (-hue_max, hue_max)),
                                   strict=True):
        row[column] = torch.empty(()).uniform_(low, high)
    row[ORDER] = torch.randperm(4).float()
    row[GRAYSCALE] = float(torch.rand(()) < grayscale_p)
    if torch.rand(()) < blur_p:
        row[BLUR_SIGMA] = torch.empty(()).uniform_(*sigma)
    row[SOLARIZE] = float(solarize and bool(torch.rand(()) < SOLARIZE_P))
    return row


def blur_kernel_size(sigma_max: float) -> int:
    """The kernel spans +-2 sigma: 2 * ceil(2 * sigma_max) + 1 (9 for the paper's 2 px)."""
    return 2 * math.ceil(2 * sigma_max) + 1


def apply_photometric(crops: torch.Tensor, params: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                      kernel_size: int) -> torch.Tensor:
    """uint8 crops [N, 3, S, S] and their parameters [N, N_PARAMS] -> normalised float32 crops.

    Which rows each operation touches is decided on the host from a CPU copy of `params`: parameters on the GPU
    cost one host-device sync here (instead of one per operation and position), parameters left on the CPU none.
    """
    if crops.shape[0] != params.shape[0]:
        raise ValueError(f"{crops.shape[0]} crops but {params.shape[0]} parameter rows")
    x = crops.float().div_(255)
    plan = params.detach().to("cpu", torch.float32)
    x = color_jitter(x, plan)
    gray, solarize = (_on(plan[:, column].bool().view(-1, 1, 1, 1), x.device) for column in (GRAYSCALE, SOLARIZE))
    x = torch.where(gray, grayscale(x).expand_as(x), x)
    x = gaussian_blur(x, plan[:, BLUR_SIGMA], kernel_size)
    x = torch.where(solarize & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)
    mean_t, std_t = (_on(torch.tensor(v).view(1, -1, 1, 1), x.device) for v in (mean, std))
    return (x - mean_t) / std_t


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device` without a sync: torch.tensor(..., device=cuda) copies and then waits for the
    stream, a non-blocking copy from pageable memory is staged at once and waits for nothing."""
    return tensor.to(device, non_blocking=True)


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Indices (on `device`) of the True rows of a mask, found where the mask is (a sync if that is a GPU)."""
    rows = mask.nonzero().flatten()
    return _on(rows, device) if rows.numel() else None


def color_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ColorJitter on the rows whose JITTER is set: the four adjustments in each row's own order."""
    order = params[:, ORDER].long()
    jittered = params[:, JITTER].bool()
    adjust = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    columns = (BRIGHTNESS, CONTRAST, SATURATION, HUE)
    for position in range(4):
        for op in range(4):
            selected = jittered & (order[:, position] == op)
            rows = _rows(selected, x.device)
            if rows is not None:
                x = x.index_copy(0, rows, adjust[op](x[rows], _on(params[selected, columns[op]], x.device)))
    return x


def _per_row(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] of RGB in [0, 1]."""
    weights = _on(torch.tensor(GRAY_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1), x.device)
    return (x * weights).sum(1, keepdim=True)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_row(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean luma."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_row(factor)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each pixel's luma."""
    f = _per_row(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]) in HSV."""
    hue, saturation, value = rgb_to_hsv(x)
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(hue, saturation, value)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hue in [0, 1), saturation, value) [N, H, W] each, of RGB in [0, 1]; grey pixels get hue 0."""
    r, g, b = x.unbind(1)
    value, argmax = x.max(1)
    chroma = value - x.min(1).values
    grey = chroma == 0
    safe_chroma = torch.where(grey, torch.ones_like(chroma), chroma)
    # the sextant offset of the largest channel, then the signed distance of the other two
    sector = torch.stack([(g - b) / safe_chroma, 2 + (b - r) / safe_chroma, 4 + (r - g) / safe_chroma], 1)
    hue = sector.gather(1, argmax.unsqueeze(1)).squeeze(1)
    hue = torch.where(grey, torch.zeros_like(hue), torch.remainder(hue / 6, 1.0))
    saturation = chroma / torch.where(value == 0, torch.ones_like(value), value)
    return hue, saturation, value


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """RGB [N, 3, H, W] of HSV, by the closed form c_n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6."""
    n = _on(torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1), hue.device)
    k = torch.remainder(n + 6 * hue.unsqueeze(1), 6)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(1) - (value * saturation).unsqueeze(1) * ramp


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding of the rows whose sigma is > 0, each with its own sigma (sigma on
    the CPU decides the rows without a host-device sync)."""
    rows = _rows(sigma > 0, x.device)
    if rows is None:
        return x
    picked = x[rows]
    n, channels, height, width = picked.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (taps / _on(sigma[sigma > 0], x.device).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # [n * channels, k]
    pad = kernel_size // 2
    # one group per (crop, channel) so every crop gets its own kernel in one convolution
    blurred = F.pad(picked.reshape(1, n * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    blurred = F.conv2d(blurred, kernel.view(-1, 1, 1, kernel_size), groups=n * channels)
    blurred = F.conv2d(blurred, kernel.view(-1, 1, kernel_size, 1), groups=n * channels)
    return x.index_copy(0, rows, blurred.view(n, channels, height, width))
