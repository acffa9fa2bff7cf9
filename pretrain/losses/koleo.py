"""KoLeo regulariser: the Kozachenko-Leonenko differential-entropy estimator (Sablayrolles et al., 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# DINOv2's value, used both inside the pairwise distance and in the log. Losses run in fp32, where 1e-8 is
# representable; in fp16 it rounds to 0 and log(0) = -inf, which is how users of the reference got KoLeo = inf.
KOLEO_EPS = 1e-8


class KoLeoLoss(nn.Module):
    """-mean_i log(d_i + eps), d_i the distance from L2-normalised row i to its nearest other row.

    Computed in fp32 with autocast disabled, whatever the input dtype. Finite for duplicate rows: the distance is
    ||z_i - z_j + eps|| as in DINOv2, never exactly 0, so its gradient is defined too. A batch of one row has no
    neighbour and gives 0, still connected to the input graph (zero gradient) so that data-parallel wrappers see
    the parameters used. DINOv2 applies it to the backbone [CLS] of each global crop separately.
    """

    def __init__(self, eps: float = KOLEO_EPS) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, D] features -> fp32 scalar."""
        if x.ndim != 2:
            raise ValueError(f"KoLeoLoss expects [batch, dim] features, got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if x.shape[0] < 2:
                return x.sum() * 0.0
            z = F.normalize(x, p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                similarity = z @ z.T
                # -inf, not the reference's -1: with two antipodal rows every similarity is -1 and the reference
                # can pick a row as its own neighbour (distance 0, loss -log(eps)).
                similarity.fill_diagonal_(float("-inf"))
                neighbour = similarity.argmax(dim=1)
            distances = F.pairwise_distance(z, z[neighbour], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
