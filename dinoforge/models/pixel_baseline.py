"""Raw pixels as a frozen "backbone": the floor any learned representation must clear.

The evaluation crop, averaged down to `side` x `side` and flattened (3 * side^2 values), stands for the [CLS] token
and for the only patch token, so k-NN, linear and logistic-regression evaluations run on it unchanged
(`python -m evaluation knn --weights pixels ...`). Averaging to 16 x 16 keeps colour and layout, drops texture.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

PIXELS_WEIGHTS = "pixels"
PIXEL_SIDE = 16


class PixelBaseline(nn.Module):
    """Average-pooled pixels with the interface feature extraction reads (`get_intermediate_layers`, `embed_dim`)."""

    def __init__(self, side: int = PIXEL_SIDE) -> None:
        super().__init__()
        self.side = side
        self.embed_dim = 3 * side * side
        self.patch_size = 1
        self.blocks = nn.ModuleList()  # no layers: every "last block" is the pixels themselves

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x.float(), self.side).flatten(1)

    def get_intermediate_layers(self, x: Tensor, n: int = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True
                                ) -> tuple[Tensor | tuple[Tensor, Tensor], ...]:
        """`n` identical layers of one token each: the pooled pixels ([B, 1, D], and [B, D] as the class token)."""
        cls = self.forward(x)
        tokens = cls[:, None, :]
        if reshape:
            tokens = cls.reshape(len(cls), self.embed_dim, 1, 1)
        layer = (tokens, cls) if return_class_token else tokens
        return tuple(layer for _ in range(n))


def pixel_fingerprint(side: int = PIXEL_SIDE) -> str:
    """What identifies the baseline in feature caches and results: it has no parameters, only its size."""
    return f"pixels:{side}x{side}"


def pixel_baseline(side: int = PIXEL_SIDE) -> PixelBaseline:
    return PixelBaseline(side).eval()


__all__ = ["PIXELS_WEIGHTS", "PIXEL_SIDE", "PixelBaseline", "pixel_baseline", "pixel_fingerprint"]
