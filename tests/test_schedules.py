"""Per-step schedules: cosine with warm-up/freeze against the formula and DINOv2's array form, teacher temperature
warm-up, last-layer freeze, lr scaling rules, and how the values reach the optimizer's param groups."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.optim import OptimConfig, build_optimizer
from pretrain.schedules import CosineSchedule, TrainingSchedules, scaled_lr


def reference_array(base, final, total, warmup=0, start=0.0, freeze=0) -> np.ndarray:
    """The precomputed array DINOv2's CosineScheduler indexes (zeros, linspace warm-up, half cosine)."""
    decay = np.arange(total - warmup - freeze)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * decay / max(len(decay), 1)))
    return np.concatenate([np.zeros(freeze), np.linspace(start, base, warmup), cosine])


@pytest.mark.parametrize("base,final,total,warmup,start,freeze", [
    (1.0, 0.1, 50, 10, 0.0, 0), (0.004, 1e-6, 37, 1, 0.0, 0), (0.04, 0.4, 20, 0, 0.0, 0),
    (2.0, 0.5, 30, 7, 0.3, 5), (0.07, 0.07, 12, 12, 0.04, 0), (1.0, 0.0, 9, 4, 0.0, 5)])
def test_every_step_equals_dinov2_array_form(base, final, total, warmup, start, freeze):
    schedule = CosineSchedule(base, final, total, warmup_steps=warmup, start_warmup_value=start, freeze_steps=freeze)
    expected = reference_array(base, final, total, warmup, start, freeze)
    assert len(expected) == total
    np.testing.assert_allclose([schedule(s) for s in range(total)], expected, rtol=1e-12, atol=1e-15)
    assert schedule(total) == schedule(10 * total) == final


def test_cosine_landmarks_against_formula():
    base, final, total, warmup = 0.5, 0.01, 110, 10
    schedule = CosineSchedule(base, final, total, warmup_steps=warmup, start_warmup_value=0.1)
    n = total - warmup
    assert schedule(0) == pytest.approx(0.1)  # warm-up start
    assert schedule(4) == pytest.approx(0.1 + (base - 0.1) * 4 / 9)  # linear, reaching base on its last step
    assert schedule(warmup - 1) == pytest.approx(base)  # warm-up end
    assert schedule(warmup) == pytest.approx(base)  # cosine starts at its top
    assert schedule(warmup + n // 2) == pytest.approx((base + final) / 2)  # middle of the cosine
    assert schedule(warmup + n // 4) == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi / 4)))
    assert schedule(total - 1) == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * (n - 1) / n)))
    assert schedule(total) == final  # end and beyond
    values = [schedule(s) for s in range(warmup, total)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))  # strictly decreasing after warm-up


def test_freeze_shifts_warmup_and_bad_lengths_are_rejected():
    schedule = CosineSchedule(1.0, 0.0, 20, warmup_steps=5, freeze_steps=3)
    assert [schedule(s) for s in range(3)] == [0.0, 0.0, 0.0]
    assert schedule(3) == 0.0 and schedule(7) == pytest.approx(1.0)  # warm-up runs from step 3 to 7
    with pytest.raises(ValueError, match="do not fit"):
        CosineSchedule(1.0, 0.0, 10, warmup_steps=8, freeze_steps=3)
    with pytest.raises(ValueError, match=">= 0"):
        CosineSchedule(1.0, 0.0, 10, warmup_steps=-1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        schedule(-1)


def test_scaling_rules():
    assert scaled_lr(0.004, 1024, "sqrt_wrt_1024") == pytest.approx(0.004)
    assert scaled_lr(0.004, 256, "sqrt_wrt_1024") == pytest.approx(0.002)
    assert scaled_lr(0.004, 4096, "sqrt_wrt_1024") == pytest.approx(0.008)
    assert scaled_lr(0.004, 256, "linear_wrt_1024") == pytest.approx(0.001)
    assert scaled_lr(0.004, 3072, "linear_wrt_1024") == pytest.approx(0.012)
    assert scaled_lr(0.004, 256, "none") == 0.004
    with pytest.raises(ValueError, match="unknown lr scaling rule 'sqrt'.*sqrt_wrt_1024"):
        scaled_lr(0.004, 256, "sqrt")
    with pytest.raises(ValueError, match="global_batch=0"):
        scaled_lr(0.004, 0, "none")


@pytest.fixture
def cfg() -> OptimConfig:
    return OptimConfig(base_lr=0.004, scaling_rule="sqrt_wrt_1024", min_lr=1e-6, warmup_steps=10,
                       weight_decay=0.04, weight_decay_end=0.4, freeze_last_layer_steps=4, momentum_teacher=0.992,
                       final_momentum_teacher=1.0, teacher_temp=0.07, warmup_teacher_temp=0.04,
                       warmup_teacher_temp_steps=30)


def test_from_config_builds_each_schedule(cfg):
    sched = TrainingSchedules.from_config(cfg, total_steps=100, global_batch=256)
    peak = 0.004 * math.sqrt(256 / 1024)
    assert sched.lr(0) == 0.0 and sched.lr(9) == pytest.approx(peak) and sched.lr(100) == 1e-6
    assert sched.lr(10 + 45) == pytest.approx((peak + 1e-6) / 2)
    assert sched.weight_decay(0) == pytest.approx(0.04) and sched.weight_decay(50) == pytest.approx(0.22)
    assert sched.weight_decay(100) == 0.4
    assert sched.momentum(0) == pytest.approx(0.992) and sched.momentum(50) == pytest.approx(0.996)
    assert sched.momentum(100) == 1.0
    with pytest.raises(ValueError, match="optim.warmup_steps=10 is longer than the run"):
        TrainingSchedules.from_config(cfg, total_steps=8, global_batch=256)


def test_teacher_temperature_warms_up_linearly_then_stays(cfg):
    temp = TrainingSchedules.from_config(cfg, total_steps=100, global_batch=1024).teacher_temp
    assert temp(0) == pytest.approx(0.04)
    for step in range(30):
        assert temp(step) == pytest.approx(0.04 + 0.03 * step / 29)
    assert [temp(s) for s in (30, 31, 99, 100, 10_000)] == [0.07] * 5
    # a warm-up longer than the run is allowed (the temperature never reaches its target), with a warning
    short = TrainingSchedules.from_config(cfg, total_steps=20, global_batch=1024).teacher_temp
    assert short(19) == pytest.approx(0.04 + 0.03 * 19 / 29)


def test_last_layer_lr_is_zero_while_frozen_then_follows_lr_unshifted(cfg):
    sched = TrainingSchedules.from_config(cfg, total_steps=100, global_batch=1024)
    assert [sched.last_layer_lr(s) for s in range(4)] == [0.0] * 4
    assert sched.lr(1) > 0
    for step in (4, 5, 9, 50, 100):
        assert sched.last_layer_lr(step) == sched.lr(step)
    values = sched.at(2)
    assert values.as_dict() == {"lr": sched.lr(2), "weight_decay": sched.weight_decay(2), "momentum": sched.momentum(2),
                                "teacher_temp": sched.teacher_temp(2), "last_layer_lr": 0.0}


class TwoLayerWithLastLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        self.last_layer = nn.Linear(3, 2)


def test_apply_to_optimizer_sets_each_group(cfg):
    optimizer = build_optimizer(TwoLayerWithLastLayer(), OptimConfig(layerwise_decay=0.5), depth=2)
    sched = TrainingSchedules.from_config(cfg, total_steps=100, global_batch=1024)
    for step in (2, 20):
        values = sched.apply_to_optimizer(optimizer, step)
        assert values == sched.at(step)
        for group in optimizer.param_groups:
            lr = values.last_layer_lr if group["is_last_layer"] else values.lr
            assert group["lr"] == pytest.approx(lr * group["lr_multiplier"])
            assert group["weight_decay"] == pytest.approx(values.weight_decay * group["wd_multiplier"])
    by_name = {name: g for g in optimizer.param_groups for name in g["names"]}
    assert by_name["blocks.0.weight"]["lr"] == pytest.approx(sched.lr(20) * 0.25)
    assert by_name["blocks.1.weight"]["weight_decay"] == pytest.approx(sched.weight_decay(20))
    assert by_name["blocks.1.bias"]["weight_decay"] == 0.0
    sched.apply_to_optimizer(optimizer, 1)
    assert by_name["last_layer.weight"]["lr"] == 0.0 and by_name["blocks.1.weight"]["lr"] > 0


def test_apply_to_foreign_optimizer_explains():
    optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    sched = TrainingSchedules.from_config(OptimConfig(warmup_steps=0), total_steps=10, global_batch=1024)
    with pytest.raises(KeyError, match="param group 0 has no lr_multiplier.*build_optimizer"):
        sched.apply_to_optimizer(optimizer, 0)
