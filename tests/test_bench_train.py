"""bench/bench_train.py: the timm baseline is the recipe's architecture, its FLOPs are counted right, and the
benchmarked configs are the recipes (with --recipe) or the CPU comparison settings (without)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the bench scripts are not installed; `bench` imports as a namespace package

from bench.bench_train import bench_config, timm_model, timm_step_flops  # noqa: E402
from dinoforge.models import vit_forward_flops_analytic  # noqa: E402
from dinoforge.models.config import build_backbone  # noqa: E402


@pytest.mark.parametrize("recipe", ["cpu_tiny", "vits14", "vitl14", "vitg14"])
def test_timm_baseline_has_the_recipes_architecture(recipe):
    cfg = bench_config(recipe, True, None, [])
    with torch.device("meta"):
        ours, theirs = build_backbone(cfg.model), timm_model(cfg)
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in (("ours", ours), ("timm", theirs))}
    assert count["timm"] == pytest.approx(count["ours"], rel=1e-3)  # ours adds the iBOT mask token
    assert theirs.embed_dim == ours.embed_dim and len(theirs.blocks) == len(ours.blocks)


@pytest.mark.parametrize("recipe", ["vits14", "vitg14"])
def test_timm_flops_are_three_forwards(recipe):
    cfg = bench_config(recipe, True, None, [])
    crops = [(2, 3, 224, 224), (8, 3, 98, 98)]
    with torch.device("meta"):
        ours = build_backbone(cfg.model)
    analytic = vit_forward_flops_analytic(embed_dim=ours.embed_dim, depth=len(ours.blocks), patch_size=14,
                                          crops=crops, ffn_layer=cfg.model.ffn_layer)
    assert timm_step_flops(cfg, crops) == pytest.approx(3 * analytic, rel=0.01)


def test_recipe_configs_and_cpu_comparison_configs():
    cpu = bench_config("vitl14", False, None, [])
    assert (cpu.precision, cpu.activation_checkpointing, cpu.model.drop_path_rate) == ("fp32", False, 0.3)
    gpu = bench_config("vitl14", True, "bf16", [])
    assert (gpu.precision, gpu.activation_checkpointing, gpu.model.drop_path_rate) == ("bf16", True, 0.4)
    assert gpu.data.batch_size_per_rank == 32
    assert bench_config("vitg14", True, None, ["model.depth=2"]).model.depth == 2
