"""A small supervised CNN embedding, trained in the test on Imagenette + Imagewoof train photos (20 classes).

It stands in for DINOv2 weights in the retrieval quality test: nothing can be downloaded here, and no weight-free
embedding separates the two sets by content (see tests/test_curate_quality.py). It never sees the val photos the test
retrieves from. Every photo is first brought to a 112 px shortest side (Imagewoof's storage size) and then to a
40 px centre square, so the sets' storage resolutions (Imagenette 224 px, Imagewoof 112 px) are no cue.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from curate.embedding.embed import Embedder

STORAGE_SIDE = 112  # Imagewoof's shortest side; Imagenette photos are brought down to it first
SIDE = 40  # stored thumbnail side
CROP = 32  # network input: random crops in training, the centre crop when embedding


def thumbnail(image: Image.Image) -> np.ndarray:
    """uint8 [SIDE, SIDE, 3]: the photo at a 112 px shortest side, centre-cropped square, resized to SIDE."""
    image.draft("RGB", (STORAGE_SIDE, STORAGE_SIDE))  # JPEGs decode at 1/2, 1/4 ... scale, never below 112 px
    image = image.convert("RGB")
    w, h = image.size
    scale = STORAGE_SIDE / min(w, h)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((SIDE, SIDE), Image.BICUBIC)
    return np.array(image)  # a writable copy: torch.from_numpy needs one


def _conv_block(dim_in: int, dim_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d in (dim_in, dim_out):
        layers += [nn.Conv2d(d, dim_out, 3, padding=1, bias=False), nn.BatchNorm2d(dim_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


def small_cnn(width: int) -> nn.Sequential:
    """Four VGG-style blocks (width, 2x, 4x, 8x channels) and global average pooling: [B, 3, H, W] -> [B, 8*width]."""
    dims = [3, width, 2 * width, 4 * width, 8 * width]
    blocks = [_conv_block(a, b) for a, b in itertools.pairwise(dims)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def train_supervised_embedder(paths: list[Path], labels: list[int], epochs: int = 3, width: int = 16,
                              batch_size: int = 128, seed: int = 0) -> Embedder:
    """Train `small_cnn` to classify `paths` (cross-entropy, SGD, one-cycle lr) and wrap its pooled features."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    thumbs = []
    for path in paths:
        with Image.open(path) as image:
            thumbs.append(thumbnail(image))
    images = torch.from_numpy(np.stack(thumbs)).permute(0, 3, 1, 2)
    targets = torch.as_tensor(labels)
    pixels = images.float() / 255
    mean, std = pixels.mean((0, 2, 3), keepdim=True), pixels.std((0, 2, 3), keepdim=True)
    del pixels
    backbone = small_cnn(width)
    classifier = nn.Linear(8 * width, int(targets.max()) + 1)
    params = [*backbone.parameters(), *classifier.parameters()]
    steps_per_epoch = len(images) // batch_size
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.2, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.25)
    backbone.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            x0, y0 = torch.randint(0, SIDE - CROP + 1, (2,), generator=generator).tolist()
            x = images[batch, :, y0:y0 + CROP, x0:x0 + CROP].float() / 255
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = F.cross_entropy(classifier(backbone((x - mean) / std)), targets[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    backbone.eval()
    margin = (SIDE - CROP) // 2

    def transform(image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(thumbnail(image)).permute(2, 0, 1).float() / 255
        return ((x[None, :, margin:margin + CROP, margin:margin + CROP] - mean) / std)[0]

    return Embedder(f"supervised-cnn{width}", 8 * width, transform, backbone)
