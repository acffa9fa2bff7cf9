"""The pretraining dataset: `(position, index)` -> multi-crop sample whose randomness depends on the position only.

Each sample's augmentation is drawn from torch's generator reseeded from (seed, stream position) inside
`torch.random.fork_rng`, so the caller's random state is untouched and the crops are the same whichever process or
DataLoader worker computes them. An unreadable image is replaced by the next readable index (deterministically)
and the replacement count travels with the sample into the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from dinoforge.data.datasets import ImageDataset
from pretrain.data.multicrop import MultiCropAugmentation
from pretrain.data.seeding import AUGMENTATION, derive_seed


class MultiCropDataset(Dataset):
    """`ds[(position, index)]` -> dict(global_crops, local_crops, label, position, n_decode_errors)."""

    def __init__(self, images: ImageDataset, augmentation: MultiCropAugmentation, seed: int = 0) -> None:
        if images.transform is not None:
            raise ValueError("MultiCropDataset decodes images itself; build the ImageDataset with transform=None")
        self.images = images
        self.augmentation = augmentation
        self.seed = seed

    @property
    def decode_errors(self) -> int:
        """Unreadable images met so far across this process and its DataLoader workers."""
        return self.images.decode_errors

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int] | int) -> dict[str, Any]:
        position, index = item if isinstance(item, tuple) else (item, item)
        image, label, n_errors = self.images.load(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, AUGMENTATION, position))
            crops = self.augmentation(image)
        return {**crops, "label": label, "position": position, "n_decode_errors": n_errors}
