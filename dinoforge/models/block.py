"""Pre-norm transformer block with LayerScale and stochastic depth, over packed tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoforge.models.attention import Attention
from dinoforge.models.drop_path import add_residual_efficient, add_residual_masked
from dinoforge.models.ffn import build_ffn
from dinoforge.models.layer_scale import LayerScale
from dinoforge.models.packing import TokenLayout

# Below this drop rate the gather/scatter of the efficient form costs more than it saves (DINOv2 uses 0.1 too).
EFFICIENT_DROP_PATH_MIN = 0.1


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that leaves a bf16 input in bf16 under autocast (same parameters and state-dict keys).

    Autocast runs layer_norm in fp32: it upcasts the bf16 residual stream (a copy) and the linear after the norm
    casts the fp32 output back (another copy). Here the norm runs in the input's dtype with its weights cast to it,
    as under FSDP2's bf16 parameters: torch's kernels still reduce in fp32 and round once on output.
    """

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):  # e.g. meta
            return super().forward(x)
        with torch.autocast(device, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); DINOv2 key names."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, drop_path: float = 0.0,
                 init_values: float | None = None, ffn_layer: str = "mlp", attn_backend: str = "auto",
                 efficient_drop_path: bool = True) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = build_ffn(ffn_layer, dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path
        self.efficient_drop_path = efficient_drop_path

    # LayerScale is folded into the branch's last linear (ls(W h + b) = (gamma W) h + gamma b): its parameter and
    # key stay where they were, its two passes over the tokens (and their backward) go.
    def _attn_branch(self, x: Tensor, layout: TokenLayout) -> Tensor:
        if isinstance(self.ls1, LayerScale):
            return self.attn(self.norm1(x), layout, out_scale=self.ls1.gamma)
        return self.attn(self.norm1(x), layout)

    def _ffn_branch(self, x: Tensor, layout: TokenLayout) -> Tensor:
        if isinstance(self.ls2, LayerScale):
            return self.mlp(self.norm2(x), out_scale=self.ls2.gamma)
        return self.mlp(self.norm2(x))

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        """x: [T, D] packed tokens described by `layout`."""
        p = self.drop_path if self.training else 0.0
        if p == 0.0:
            x = x + self._attn_branch(x, layout)
            return x + self._ffn_branch(x, layout)
        add = add_residual_efficient if self.efficient_drop_path and p > EFFICIENT_DROP_PATH_MIN \
            else add_residual_masked
        x = add(x, layout, self._attn_branch, p)
        return add(x, layout, self._ffn_branch, p)
