"""FLOP counting: the measured count of a real forward equals the analytic ViT formula, attention included."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dinoforge.models.attention import BACKEND_ENV
from dinoforge.models.flops import count_forward_flops, flop_counter, train_step_flops, vit_forward_flops_analytic
from dinoforge.models.vision_transformer import DinoVisionTransformer, vit_giant2

MIXED_CROPS = [(2, 3, 56, 56), (3, 3, 28, 42)]


def small_vit(registers: int = 0, ffn: str = "mlp", **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=2,
                                 num_register_tokens=registers, ffn_layer=ffn, **kwargs)


def test_analytic_formula_by_hand():
    # D=8, one block, 2x2 patches of a 1x3x4x4 image: N=4 patches, T=5 tokens, MLP width 32.
    # MACs: patch embedding 4*(3*2*2)*8 = 384; qkv 5*8*24 = 960; QK^T and AV 2*5*5*8 = 400; proj 5*8*8 = 320;
    # MLP 2*5*8*32 = 2560. FLOPs = 2 * 4624.
    flops = vit_forward_flops_analytic(embed_dim=8, depth=1, patch_size=2, crops=[(1, 3, 4, 4)])
    assert flops == 2 * (384 + 960 + 400 + 320 + 2560)


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("ffn", ["mlp", "swiglufused"])
def test_counted_equals_analytic_for_mixed_crops(registers, ffn):
    model = small_vit(registers, ffn)
    counted = count_forward_flops(model, MIXED_CROPS)
    expected = vit_forward_flops_analytic(embed_dim=48, depth=2, patch_size=14, crops=MIXED_CROPS,
                                          num_register_tokens=registers, ffn_layer=ffn)
    assert counted == expected


CPU_SDPA_BACKENDS = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]


@pytest.mark.parametrize("sdpa_backend", CPU_SDPA_BACKENDS, ids=lambda b: b.name)
def test_a_real_cpu_forward_counts_attention_on_every_sdpa_kernel(sdpa_backend):
    """Whatever kernel the installed torch runs on CPU, a real forward measures the analytic count, attention
    included (torch 2.14 counts no attention on the CPU flash kernel by itself)."""
    torch.manual_seed(0)
    model = small_vit(registers=4).eval()
    crops = [torch.randn(*shape) for shape in MIXED_CROPS]
    with torch.no_grad(), sdpa_kernel(sdpa_backend), flop_counter() as counter:
        model.forward_features(crops)
    expected = vit_forward_flops_analytic(embed_dim=48, depth=2, patch_size=14, crops=MIXED_CROPS,
                                          num_register_tokens=4)
    assert counter.get_total_flops() == expected == count_forward_flops(model, crops)


def test_fused_attention_backward_is_counted_as_five_matmuls():
    b, h, n, d = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert counter.get_total_flops() == 2 * b * h * n * n * d * (2 + 5)


@pytest.mark.parametrize("name", ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"])
def test_every_fused_sdpa_kernel_of_this_torch_has_a_formula(name):
    """The GPU kernels cannot run here: check that the counter has a formula for each one this torch defines."""
    if not hasattr(torch.ops.aten, name):
        pytest.skip(f"torch {torch.__version__} has no {name}")
    packet = getattr(torch.ops.aten, name)
    assert packet in flop_counter().flop_registry
    assert getattr(torch.ops.aten, name + "_backward") in flop_counter().flop_registry


def test_counting_leaves_the_model_and_environment_alone(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "xformers")  # unusable on the meta device: counting must not depend on it
    model = small_vit(drop_path_rate=0.5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_forward_flops(model, MIXED_CROPS)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert os.environ[BACKEND_ENV] == "xformers"


def test_stochastic_depth_does_not_change_the_count():
    crops = [(4, 3, 56, 56)]
    assert count_forward_flops(small_vit(drop_path_rate=0.9).train(), crops) == count_forward_flops(small_vit(), crops)


def test_vit_giant_on_meta_is_counted_without_memory():
    with torch.device("meta"):
        model = vit_giant2(patch_size=14, img_size=518, ffn_layer="swiglufused", num_register_tokens=4)
    crops = [(32, 3, 224, 224), (64, 3, 98, 98)]
    expected = vit_forward_flops_analytic(embed_dim=1536, depth=40, patch_size=14, crops=crops,
                                          num_register_tokens=4, ffn_layer="swiglufused")
    assert count_forward_flops(model, crops) == expected
    # Sanity against the rule of thumb 2 * parameters * tokens (attention adds a few % at 261 tokens).
    params = sum(p.numel() for p in model.blocks.parameters())
    rough = 2 * params * 261
    assert 1.0 < count_forward_flops(model, [(1, 3, 224, 224)]) / rough < 1.1


def test_train_step_is_three_student_forwards_plus_a_teacher_forward():
    student, teacher = small_vit(), small_vit(registers=4)
    global_crops, local_crops = [(4, 3, 56, 56)], [(8, 3, 28, 28)]
    student_crops = global_crops + local_crops
    expected = 3 * count_forward_flops(student, student_crops) + count_forward_flops(teacher, global_crops)
    assert train_step_flops(student, student_crops, teacher, global_crops) == expected
    assert train_step_flops(student, student_crops) == 3 * count_forward_flops(student, student_crops)
    with pytest.raises(ValueError, match="teacher_crops"):
        train_step_flops(student, student_crops, teacher)


@pytest.mark.parametrize("crops", [[], [(3, 56, 56)]])
def test_bad_crop_sets_are_rejected(crops):
    with pytest.raises(ValueError):
        count_forward_flops(small_vit(), crops)
