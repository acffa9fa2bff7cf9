"""bench/bench_train.py: the timm baseline is the recipe's architecture, its FLOPs are counted right, the
benchmarked configs are the recipes (with --recipe) or the CPU comparison settings (without), and `--profile`
reports every phase of the step (bench/step_profile.py)."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the bench scripts are not installed; `bench` imports as a namespace package

from bench.bench_train import bench_config, bench_model, timm_model, timm_step_flops, write_profiles  # noqa: E402
from bench.step_profile import device_events, idle_gaps, top_kernels  # noqa: E402
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


def test_profile_names_the_phases_and_writes_trace_and_tables(tmp_path):
    """`--profile` on CPU: every phase of our step and of timm's is timed, the top operators and host reads are
    counted, and the trace, profile.json and profile.md are written."""
    out = bench_model("cpu_tiny", 2, 1, torch.device("cpu"), ["ours", "timm"], precision="fp32",
                      overrides=["model.depth=1"], profile_dir=tmp_path, profile_steps=1)
    ours = out["ours"]["profile"]
    assert set(ours["phases"]) >= {"photometric", "zero_grad", "forward", "backward", "clip_grad", "optimizer", "ema",
                                   "teacher_backbone", "teacher_dino_head", "dino_sinkhorn_knopp",
                                   "ibot_sinkhorn_knopp", "student_backbone", "student_dino_head", "dino_loss",
                                   "ibot_loss", "koleo_loss"}
    assert ours["phases"]["koleo_loss"]["calls_per_step"] == 2  # one per global crop
    assert ours["phases"]["forward"]["ms_per_step"] > ours["phases"]["student_backbone"]["ms_per_step"] > 0
    kernels = ours["top_kernels"]
    assert kernels and sum(k["share"] for k in kernels) <= 1 + 1e-9 and ours["device_idle"] is None
    assert not any(k["name"].startswith("phase/") for k in kernels)
    assert set(out["timm_forward_backward"]["profile"]["phases"]) == {"forward", "backward", "optimizer"}

    with gzip.open(ours["trace"]) as trace:
        names = {event.get("name") for event in json.load(trace)["traceEvents"]}
    assert {"phase/dino_sinkhorn_knopp", "phase/backward", "step"} <= names
    write_profiles({"cpu_tiny": out}, tmp_path)
    assert set(json.loads((tmp_path / "profile.json").read_text())) == {"cpu_tiny ours",
                                                                        "cpu_tiny timm_forward_backward"}
    text = (tmp_path / "profile.md").read_text()
    assert "### cpu_tiny ours" in text and "| dino_sinkhorn_knopp |" in text and "| kernel |" in text


def test_idle_gaps_between_kernels():
    kernels = [(0.0, 10.0, "a"), (5.0, 30.0, "b"), (100.0, 110.0, "c"), (112.0, 120.0, "d"), (150.0, 160.0, "e")]
    idle = idle_gaps(kernels, steps=2, min_gap_us=5)
    # gaps: 30 -> 100 after b (a ends inside b), 120 -> 150; the 2 us between c and d is launch latency
    assert [(g["us"], g["after"], g["before"]) for g in idle["gaps"]] == [(70.0, "b", "c"), (30.0, "d", "e")]
    assert idle["idle_ms_per_step"] == pytest.approx(0.05) and idle["idle_share"] == pytest.approx(100 / 160)
    assert idle_gaps([], steps=1)["idle_ms_per_step"] is None


def test_device_tables_leave_out_the_annotations_kineto_mirrors_on_the_device():
    def event(name, start, end, annotation=False):
        return SimpleNamespace(name=name, device_type=DeviceType.CUDA, is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start))

    events = [event("phase/forward", 0.0, 100.0, annotation=True), event("step", 0.0, 100.0),
              event("gemm", 0.0, 30.0), event("softmax", 60.0, 70.0), event("gemm", 70.0, 90.0)]
    assert [e.name for e in device_events(events)] == ["gemm", "softmax", "gemm"]
    rows, busy_ms = top_kernels(events, on_device=True, steps=1)
    assert [(r["name"], r["calls_per_step"]) for r in rows] == [("gemm", 2), ("softmax", 1)] and busy_ms == 0.06
