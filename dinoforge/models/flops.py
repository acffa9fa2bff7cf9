"""FLOPs of ViT forward passes over a crop set, measured with torch's flop counter and derived analytically.

Convention (torch.utils.flop_counter, and MFU papers): 2 FLOPs per multiply-accumulate of matmuls, convolutions and
attention (QK^T and AV); norms, activations, softmax and bias additions are not counted (under 1% for a ViT).

torch's counter knows attention only by the names of the fused kernels it has formulas for, and those change between
versions (2.14 dropped the CPU flash kernel `_scaled_dot_product_flash_attention_for_cpu`). `flop_counter()` therefore
adds a formula for every fused SDPA kernel of the installed torch that has none, so every path (CPU flash, math, which
decomposes into counted matmuls, efficient, cuDNN) is counted; tests check each against the analytic count. xformers
kernels see one packed sequence and a block-diagonal mask, so their shapes do not give the FLOPs: counts always run
the SDPA path, which computes the same products.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from dinoforge.models.attention import BACKEND_ENV
from dinoforge.models.ffn import swiglu_hidden_features

CropSpec = Tensor | Sequence[int]
SDPA_KERNEL_PREFIX = "_scaled_dot_product_"


def _sdpa_forward_flops(q: Sequence[int], k: Sequence[int], v: Sequence[int], *args, **kwargs) -> int:
    """QK^T and AV of [B, H, N, d] inputs (shapes, as torch's counter passes them)."""
    b, h, n_q, d_qk = q
    n_k, d_v = k[2], v[3]
    return 2 * b * h * n_q * n_k * (d_qk + d_v)


def _sdpa_backward_flops(grad_out: Sequence[int], q: Sequence[int], k: Sequence[int], v: Sequence[int], *args,
                         **kwargs) -> int:
    """Fused backward: recompute QK^T, then the gradients of both products (five matmuls, as torch counts them)."""
    b, h, n_q, d_qk = q
    n_k, d_v = k[2], v[3]
    return 2 * b * h * n_q * n_k * (3 * d_qk + 2 * d_v)


@functools.cache
def missing_attention_formulas() -> dict:
    """Formulas for the installed torch's fused SDPA kernels that its flop counter does not know."""
    known = set(flop_registry)
    formulas = {}
    for name in dir(torch.ops.aten):
        if not (name.startswith(SDPA_KERNEL_PREFIX) and "attention" in name) or name.endswith("_for_mps"):
            continue
        packet = getattr(torch.ops.aten, name)
        if packet not in known:
            formulas[packet] = _sdpa_backward_flops if name.endswith("_backward") else _sdpa_forward_flops
    return formulas


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, completed with formulas for every fused attention kernel of this torch."""
    return FlopCounterMode(display=False, custom_mapping=missing_attention_formulas())


def _crop_shape(crop: CropSpec) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in (crop.shape if isinstance(crop, Tensor) else crop))
    if len(shape) != 4:
        raise ValueError(f"a crop is a [B, C, H, W] tensor or shape, got shape {shape}")
    return shape  # type: ignore[return-value]


@contextmanager
def _inference_setup(model: nn.Module) -> Iterator[None]:
    """Eval mode (no stochastic depth: MFU counts the whole model) and the SDPA attention path (the one the meta
    device runs; xformers computes the same products), both restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    saved_env = os.environ.get(BACKEND_ENV)
    model.eval()
    os.environ[BACKEND_ENV] = "sdpa"
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        if saved_env is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = saved_env


def count_forward_flops(model: nn.Module, crops: Sequence[CropSpec]) -> int:
    """FLOPs of one packed forward of `model` (a DinoVisionTransformer) over crop batches of the given shapes.

    Runs the real forward code under `FlopCounterMode` with meta-device stand-ins for the weights and inputs, so it
    costs no memory or compute even for ViT-g, and leaves the model untouched.
    """
    if not crops:
        raise ValueError("count_forward_flops needs at least one crop batch")
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    dtype = next(iter(params.values())).dtype if params else torch.float32
    meta_state = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in params.items()}
    inputs = [torch.empty(_crop_shape(c), dtype=dtype, device="meta") for c in crops]
    with _inference_setup(model), torch.no_grad(), flop_counter() as counter:
        functional_call(model, meta_state, (inputs,), {"is_training": True})
    return int(counter.get_total_flops())


def vit_forward_flops_analytic(
    *,
    embed_dim: int,
    depth: int,
    patch_size: int,
    crops: Sequence[CropSpec],
    num_register_tokens: int = 0,
    mlp_ratio: float = 4.0,
    ffn_layer: str = "mlp",
) -> int:
    """The same count from the formula, per crop batch of B images, N = HW/p^2 patches, T = 1 + R + N tokens:

    patch embedding 2*B*N*(C*p*p)*D, then per block: qkv 2*B*T*D*3D, QK^T and AV 2*2*B*T^2*D (summed over heads),
    output projection 2*B*T*D^2, MLP 2*2*B*T*D*h (h = mlp_ratio*D) or SwiGLU 2*3*B*T*D*h' (h' = 2/3 h rounded up to
    a multiple of 8: w12 is 2h' wide, w3 h').
    """
    d = embed_dim
    hidden = int(d * mlp_ratio)
    if ffn_layer == "mlp":
        ffn_macs_per_token = 2 * d * hidden
    elif ffn_layer in ("swiglu", "swiglufused"):
        ffn_macs_per_token = 3 * d * swiglu_hidden_features(hidden)
    else:
        raise ValueError(f"unknown ffn_layer {ffn_layer!r}; choose 'mlp', 'swiglu' or 'swiglufused'")
    total_macs = 0
    for crop in crops:
        b, c, h, w = _crop_shape(crop)
        n = (h // patch_size) * (w // patch_size)
        t = 1 + num_register_tokens + n
        patch_embed = b * n * c * patch_size * patch_size * d
        per_block = b * t * (3 * d * d + d * d + ffn_macs_per_token) + 2 * b * t * t * d
        total_macs += patch_embed + depth * per_block
    return 2 * total_macs


def train_step_flops(
    student: nn.Module,
    student_crops: Sequence[CropSpec],
    teacher: nn.Module | None = None,
    teacher_crops: Sequence[CropSpec] | None = None,
) -> int:
    """FLOPs of one self-distillation training step of the backbones, for MFU: 3x the student forward (forward +
    backward, the backward costing twice the forward) plus one forward of the teacher (no gradient) on its crops
    (usually the global crops). Heads are not included: count them separately if needed (a few % with iBOT)."""
    flops = 3 * count_forward_flops(student, student_crops)
    if teacher is not None:
        if not teacher_crops:
            raise ValueError("train_step_flops: a teacher needs teacher_crops (usually the global crops)")
        flops += count_forward_flops(teacher, teacher_crops)
    return flops
