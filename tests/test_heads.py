"""DINOHead: DINOv2 checkpoint key layout, init, and outputs against a manual computation and torch's weight_norm."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinoforge.models.heads import DINOHead, WeightNormLinear


def reference_head(in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Module:
    """DINOv2's construction of the default head with torch's (deprecated) weight_norm, which defines the keys."""
    head = nn.Module()
    head.mlp = nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, bottleneck_dim),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        head.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    return head


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_default_head_keys_and_shapes_match_dinov2() -> None:
    head = DINOHead(in_dim=24, out_dim=40, hidden_dim=32, bottleneck_dim=16)
    assert shapes(head) == {
        "mlp.0.weight": (32, 24),
        "mlp.0.bias": (32,),
        "mlp.2.weight": (32, 32),
        "mlp.2.bias": (32,),
        "mlp.4.weight": (16, 32),
        "mlp.4.bias": (16,),
        "last_layer.weight_g": (40, 1),
        "last_layer.weight_v": (40, 16),
    }
    assert shapes(head) == shapes(reference_head(24, 40, 32, 16))


def test_head_variants_keep_dinov2_module_indices() -> None:
    with_bn = DINOHead(8, 10, use_bn=True, nlayers=3, hidden_dim=12, bottleneck_dim=6, mlp_bias=False)
    keys = set(with_bn.state_dict())
    assert {"mlp.0.weight", "mlp.1.weight", "mlp.1.running_mean", "mlp.3.weight", "mlp.4.running_var"} <= keys
    assert "mlp.6.weight" in keys and "mlp.0.bias" not in keys
    single = DINOHead(8, 10, nlayers=1, bottleneck_dim=6)
    assert shapes(single) == {
        "mlp.weight": (6, 8),
        "mlp.bias": (6,),
        "last_layer.weight_g": (10, 1),
        "last_layer.weight_v": (10, 6),
    }
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(8, 10, nlayers=0)


def test_head_output_equals_manual_computation() -> None:
    torch.manual_seed(0)
    head = DINOHead(in_dim=12, out_dim=20, hidden_dim=16, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # exercise g, not only its initial 1
    x = torch.randn(5, 12)
    p = dict(head.named_parameters())
    h = F.gelu(x @ p["mlp.0.weight"].T + p["mlp.0.bias"])
    h = F.gelu(h @ p["mlp.2.weight"].T + p["mlp.2.bias"])
    h = h @ p["mlp.4.weight"].T + p["mlp.4.bias"]
    h = h / h.norm(dim=1, keepdim=True)
    v, g = p["last_layer.weight_v"], p["last_layer.weight_g"]
    expected = h @ (g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected)


def test_head_matches_torch_weight_norm_reference_forward_and_backward() -> None:
    torch.manual_seed(1)
    ours = DINOHead(in_dim=12, out_dim=20, hidden_dim=16, bottleneck_dim=8)
    reference = reference_head(12, 20, 16, 8)
    with torch.no_grad():
        ours.last_layer.weight_g.uniform_(0.5, 2.0)
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(6, 12)

    def reference_forward(inputs: torch.Tensor) -> torch.Tensor:
        return reference.last_layer(F.normalize(reference.mlp(inputs), dim=-1))

    out, ref_out = ours(x), reference_forward(x)
    torch.testing.assert_close(out, ref_out)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (ref_out * weights).sum().backward()
    ours_grads = dict(ours.named_parameters())
    for name, param in reference.named_parameters():
        # The L2-normalisation of a small bottleneck output amplifies gradients; compare relative to their scale.
        scale = param.grad.abs().max().item()
        torch.testing.assert_close(ours_grads[name].grad, param.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_head_init_follows_dinov2() -> None:
    torch.manual_seed(2)
    head = DINOHead(in_dim=256, out_dim=512, hidden_dim=512, bottleneck_dim=256)
    for index in (0, 2, 4):
        linear = head.mlp[index]
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
        assert abs(linear.weight.std().item() - 0.02) < 0.002
    assert torch.equal(head.last_layer.weight_g, torch.ones(512, 1))
    # v keeps nn.Linear's default init (DINOv2 applies trunc_normal before creating the last layer).
    bound = 1.0 / 256**0.5
    assert head.last_layer.weight_v.abs().max() <= bound
    assert head.last_layer.weight_v.std().item() > 0.8 * bound / 3**0.5


def test_norm_last_layer_freezes_weight_g() -> None:
    assert DINOHead(8, 10, hidden_dim=8, bottleneck_dim=4).last_layer.weight_g.requires_grad
    frozen = DINOHead(8, 10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    assert not frozen.last_layer.weight_g.requires_grad
    assert frozen.last_layer.weight_v.requires_grad
    assert "last_layer.weight_g" in frozen.state_dict()


def test_head_accepts_class_tokens_and_token_sets() -> None:
    torch.manual_seed(3)
    head = DINOHead(in_dim=8, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    tokens = torch.randn(3, 5, 8)
    flat = head(tokens.reshape(15, 8))  # [M, D] masked-token set
    assert flat.shape == (15, 10)
    torch.testing.assert_close(head(tokens), flat.reshape(3, 5, 10))
    assert head(tokens[:, 0]).shape == (3, 10)  # [B, D] class tokens


def test_weight_norm_linear_rows_have_norm_g() -> None:
    torch.manual_seed(4)
    layer = WeightNormLinear(6, 4)
    with torch.no_grad():
        layer.weight_g.copy_(torch.tensor([[1.0], [2.0], [0.5], [3.0]]))
    torch.testing.assert_close(layer.effective_weight().norm(dim=1), torch.tensor([1.0, 2.0, 0.5, 3.0]))


def test_head_bf16_forward_is_finite() -> None:
    torch.manual_seed(5)
    head = DINOHead(in_dim=8, out_dim=10, hidden_dim=8, bottleneck_dim=4).to(torch.bfloat16)
    out = head(torch.randn(4, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
