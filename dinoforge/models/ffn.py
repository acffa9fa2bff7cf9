"""Feed-forward layers of a transformer block: the plain MLP and SwiGLU (ViT-g)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def scaled_linear(linear: nn.Linear, x: Tensor, out_scale: Tensor | None) -> Tensor:
    """linear(x) * out_scale with the scale folded into the weight and bias: a [out, in] multiply instead of two
    passes over the [tokens, out] activations (forward and backward), how the blocks apply LayerScale."""
    if out_scale is None:
        return linear(x)
    bias = None if linear.bias is None else linear.bias * out_scale
    return F.linear(x, linear.weight * out_scale[:, None], bias)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        """`out_scale` [in_features] multiplies the output (see scaled_linear)."""
        return scaled_linear(self.fc2, self.act(self.fc1(x)), out_scale)


def swiglu_hidden_features(hidden_features: int) -> int:
    """DINOv2's SwiGLU width: 2/3 of the MLP width (same parameter count), rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU (Shazeer 2020) with the gate and value projections fused in `w12`, as DINOv2 stores them."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        """`out_scale` [in_features] multiplies the output (see scaled_linear)."""
        gate, value = self.w12(x).chunk(2, dim=-1)
        return scaled_linear(self.w3, F.silu(gate) * value, out_scale)


FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFN, "swiglufused": SwiGLUFFN}


def build_ffn(name: str, dim: int, hidden_features: int, bias: bool = True) -> nn.Module:
    if name not in FFN_LAYERS:
        raise ValueError(f"unknown ffn_layer {name!r}; choose one of {sorted(FFN_LAYERS)}")
    return FFN_LAYERS[name](dim, hidden_features, bias=bias)
