"""DINO projection head (shared by the DINO [CLS] loss and, shared or separate, the iBOT patch loss)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = weight_g * weight_v / ||weight_v|| (norm per output row).

    Same parameters, names and shapes as torch.nn.utils.weight_norm(nn.Linear(..., bias=False)) with dim=0:
    weight_g [out_features, 1], weight_v [out_features, in_features]. Written out as plain Parameters because
    torch's parametrization API renames the state-dict keys and does not compose well with FSDP2.
    """

    def __init__(self, in_features: int, out_features: int, train_weight_g: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=train_weight_g)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """v as nn.Linear's default init (what DINOv2's head gets), g = 1 (unit-norm prototypes)."""
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.fill_(1.0)

    def effective_weight(self) -> Tensor:
        """The effective [out_features, in_features] weight."""
        return self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Module:
    """Linear(-BN)-GELU blocks ending in a Linear to the bottleneck; module indices match DINOv2's keys."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for layer_in, layer_out in zip(dims[:-1], dims[1:], strict=True):
        layers.append(nn.Linear(layer_in, layer_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(layer_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised prototypes: [..., in_dim] features -> [..., out_dim] logits.

    State-dict keys and shapes match DINOv2 training checkpoints (`mlp.0.weight`, `mlp.0.bias`, `mlp.2.*`,
    `mlp.4.*`, `last_layer.weight_g` [out_dim, 1], `last_layer.weight_v` [out_dim, bottleneck_dim] for the default
    3 layers without BN). Works on [B, D] class tokens and on [M, D] sets of patch tokens alike (any leading
    dims without BN; BatchNorm1d needs 2-D input).

    norm_last_layer=True freezes weight_g at 1 (DINO v1's option, prototypes stay unit-norm); DINOv2's head leaves
    it trainable, hence the default False.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
        norm_last_layer: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn=use_bn, bias=mlp_bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, train_weight_g=not norm_last_layer)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DINOv2 init: MLP Linear weights trunc_normal(std=0.02), zero biases; see WeightNormLinear for the last.

        Public so a head built on the meta device can be initialised after it is materialised.
        """
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()
        self.last_layer.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # 1e-12 is below fp16's smallest subnormal and would round to 0 (division by zero for a zero row).
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)
