"""Training warns, once, when the teacher's targets are uniform or collapsed, and records it in metrics.jsonl: unit
checks of the thresholds, and real runs forced into each shape."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from PIL import Image

from dinoforge.config import load_config
from pretrain.__main__ import main
from pretrain.plot import knn_keys
from pretrain.signal_watch import SignalWatch
from pretrain.train import train
from pretrain.train_config import TrainConfig

CPU_TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "cpu_tiny.yaml"
K = 64


def test_uniform_targets_are_reported_once_after_warm_up(caplog):
    watch = SignalWatch(prototypes=K, rows=64, after_step=3)
    uniform = math.log(K) * 0.995
    assert watch.check(2, uniform, math.log(K)) == []  # still warming up
    with caplog.at_level(logging.WARNING):
        problems = watch.check(3, uniform, math.log(K))
        assert watch.check(4, uniform, math.log(K)) == []  # once per run
    assert [p.shape for p in problems] == ["uniform_targets"]
    assert "model.layerscale" in problems[0].message and "99.5%" in problems[0].message
    assert len([r for r in caplog.records if "uniform" in r.message]) == 1


def test_collapse_is_judged_against_what_the_batch_can_spread_over():
    # 4096 prototypes but 64 rows: sharp, distinct rows give a batch-mean entropy near log 64, not log 4096
    watch = SignalWatch(prototypes=4096, rows=64, after_step=0)
    assert watch.check(0, teacher_entropy=0.5, teacher_mean_entropy=0.9 * math.log(64)) == []
    problems = watch.check(1, teacher_entropy=0.01, teacher_mean_entropy=0.1)
    assert [p.shape for p in problems] == ["collapse"] and "loss.centering" in problems[0].message


def forced_run(folder: Path, out: Path, name: str, **extra: object) -> Path:
    values = {"name": name, "output_dir": str(out), "total_steps": 4, "log_every": 1, "checkpoint_every": 0,
              "peak_tflops": 1.0, "data.dataset": str(folder), "data.batch_size_per_rank": 8,
              "data.num_workers": 0, "model.depth": 2, "data.multicrop.global_crops_size": 16,
              "data.multicrop.local_crops_size": 8, "data.multicrop.local_crops_number": 2,
              "loss.dino_head.out_dim": K, "loss.ibot_head.out_dim": K, "optim.warmup_steps": 2,
              "optim.freeze_last_layer_steps": 0, **extra}
    return train(load_config(TrainConfig, CPU_TINY, [f"{k}={v}" for k, v in values.items()]))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def muted_run(noise_image_folder, tmp_path_factory, one_thread) -> Path:
    """LayerScale 1e-5 gives every image the same CLS token: Sinkhorn-Knopp's targets are exactly uniform."""
    return forced_run(noise_image_folder, tmp_path_factory.mktemp("runs"), "uniform", **{"model.layerscale": 1e-5})


def test_a_run_with_muted_blocks_reports_uniform_targets(muted_run):
    entropies = [r["teacher_entropy"] for r in records(muted_run) if "teacher_entropy" in r]
    assert min(entropies) > 0.999 * math.log(K)
    notes = [r for r in records(muted_run) if "signal_problem" in r]
    assert [(r["step"], r["signal_problem"]) for r in notes] == [(2, "uniform_targets")]


def test_a_run_without_sinkhorn_knopp_and_a_cold_teacher_reports_collapse(noise_image_folder, tmp_path,
                                                                           one_thread):
    """Identical CLS tokens, no centering update and a near-zero temperature: one prototype for every image."""
    run = forced_run(noise_image_folder, tmp_path, "collapse", **{
        "model.layerscale": 1e-5, "loss.centering": "centering", "loss.center_momentum": 1.0,
        "optim.teacher_temp": 0.001, "optim.warmup_teacher_temp": 0.001})
    assert [r["signal_problem"] for r in records(run) if "signal_problem" in r] == ["collapse"]


def test_plot_writes_the_curves_of_a_run(muted_run, tmp_path):
    assert main(["plot", str(muted_run), "--out", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "c.png") as image:
        assert image.format == "PNG" and image.width > 1000
    assert main(["plot", str(muted_run)]) == 0 and (muted_run / "curves.png").is_file()


def test_plot_of_a_run_without_metrics_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 1
    assert "has no logged step yet" in capsys.readouterr().err


def test_the_knn_panel_plots_accuracies_not_the_monitors_timing():
    records = [{"step": 10, "dino_loss": 6.0}, {"step": 10, "knn/top1_k20": 31.0, "knn/top1_k10": 30.0,
                                                "knn/top5_k20": 80.0, "knn/seconds": 12.5}]
    assert knn_keys(records) == ("knn/top1_k10", "knn/top1_k20")
