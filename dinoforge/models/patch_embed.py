"""Image to patch tokens."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping `patch_size` patches and project each to `embed_dim`."""

    def __init__(self, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, H/p * W/p, D] (row-major patch order)."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}; "
                f"resize or crop to a multiple (e.g. {h // self.patch_size * self.patch_size}x"
                f"{w // self.patch_size * self.patch_size})"
            )
        return self.proj(x).flatten(2).transpose(1, 2)
