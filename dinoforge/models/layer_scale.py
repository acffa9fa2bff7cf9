"""LayerScale (Touvron et al. 2021, CaiT): a learned per-channel scale on each residual branch."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        # In the activation's dtype: under bf16 autocast an fp32 gamma would promote the branch, and with it the whole
        # residual stream, to fp32 (mixed-dtype elementwise kernels, an fp32 index_add in efficient drop path). FSDP2's
        # bf16 parameters and DINOv2 compute it in bf16 too; its gradient is reduced over tokens with fp32 accumulation.
        return x * self.gamma.to(x.dtype)
