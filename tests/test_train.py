"""The training loop end to end on CPU: artefacts, resume after a kill (on another process count), 2 processes
against 1, and non-finite steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from curate.embedding.embed import EmbedConfig, build_embedder
from dinoforge.config import load_config
from dinoforge.models import load_pretrained
from dinoforge.models.loading import load_backbone as build_eval_backbone
from evaluation.config import BackboneConfig
from pretrain.metrics import read_metrics
from pretrain.train import NonFiniteLossError, Trainer
from pretrain.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pretrain" / "cpu_tiny.yaml"
LOSS_KEYS = ("total_loss", "dino_loss", "ibot_loss")


def tiny_overrides(data: Path, out: Path, name: str, steps: int = 6, **extra: object) -> list[str]:
    """A 2-block ViT with small heads: seconds per run, every code path of the real recipe."""
    values = {
        "name": name, "output_dir": str(out), "total_steps": steps, "log_every": 1, "checkpoint_every": 2,
        "data.dataset": str(data), "data.batch_size_per_rank": 8, "data.num_workers": 0,
        "data.multicrop.global_crops_size": 32, "data.multicrop.local_crops_size": 16,
        "data.multicrop.local_crops_number": 2, "model.depth": 2,
        "loss.dino_head.out_dim": 64, "loss.dino_head.hidden_dim": 32, "loss.dino_head.bottleneck_dim": 16,
        "optim.warmup_steps": 2, "optim.warmup_teacher_temp_steps": 2, "optim.freeze_last_layer_steps": 1,
        "peak_tflops": 1.0, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_cli(overrides: list[str], nproc: int = 1, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "pretrain", "train", str(CONFIG), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pretrain", "train", str(CONFIG), *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]


def losses(run_dir: Path) -> dict[int, tuple[float, ...]]:
    return {int(r["step"]): tuple(r[k] for k in LOSS_KEYS) for r in read_metrics(run_dir)}


def assert_same_losses(a: Path, b: Path, rtol: float) -> None:
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    for step in la:
        np.testing.assert_allclose(la[step], lb[step], rtol=rtol, err_msg=f"step {step}")


def test_run_writes_metrics_checkpoints_and_loadable_export(image_folder, tmp_path):
    finish(run_cli(tiny_overrides(image_folder, tmp_path, "run", steps=4)))
    run = tmp_path / "run"
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    expected = {"total_loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "weight_decay", "momentum",
                "teacher_temp", "grad_norm", "images_per_s", "data_time_s", "mfu", "teacher_entropy",
                "skipped_steps", "decode_errors", "peak_memory_gib", "teacher_mean_entropy"}
    assert expected <= records[-1].keys()
    assert all(np.isfinite(r["total_loss"]) for r in records)
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]

    cfg = load_config(TrainConfig, run / "config.yaml")
    from dinoforge.models.config import build_backbone

    backbone = build_backbone(cfg.model, drop_path=False).eval()
    result = load_pretrained(backbone, run / "export" / "teacher_backbone.safetensors")
    assert result.layout == "official"
    assert json.loads((run / "export" / "model.json").read_text())["depth"] == 2
    with torch.no_grad():
        assert torch.isfinite(backbone(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(image_folder, tmp_path):
    """FSDP2 over 2 gloo processes with 4 images each == 1 process with 8 (KoLeo is a per-process statistic and
    stochastic depth draws per process, as in the reference, so both are off here)."""
    common = {"loss.koleo_loss_weight": 0.0, "checkpoint_every": 0}
    one = run_cli(tiny_overrides(image_folder, tmp_path, "one", steps=4, **common))
    finish(one)
    two = run_cli(tiny_overrides(image_folder, tmp_path, "two", steps=4, **{**common,
                                                                              "data.batch_size_per_rank": 4}), nproc=2)
    finish(two)
    assert_same_losses(tmp_path / "one", tmp_path / "two", rtol=2e-5)


@pytest.mark.slow
def test_killed_run_resumed_on_two_processes_matches_uninterrupted_run(image_folder, tmp_path):
    common = {"loss.koleo_loss_weight": 0.0, "total_steps": 8}
    finish(run_cli(tiny_overrides(image_folder, tmp_path, "straight", **common)))

    overrides = tiny_overrides(image_folder, tmp_path, "killed", **common)
    proc = run_cli(overrides, start_new_session=True)
    marker = tmp_path / "killed" / "checkpoints" / "step_00000004"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    steps_before = {r["step"] for r in read_metrics(tmp_path / "killed")}
    assert 3 in steps_before and 7 not in steps_before

    resumed = [o if not o.startswith("data.batch_size_per_rank") else "data.batch_size_per_rank=4" for o in overrides]
    finish(run_cli(resumed, nproc=2))
    assert_same_losses(tmp_path / "straight", tmp_path / "killed", rtol=2e-5)


def test_non_finite_steps_are_skipped_then_the_run_stops(image_folder, tmp_path, monkeypatch):
    cfg = load_config(TrainConfig, CONFIG, tiny_overrides(image_folder, tmp_path, "nan", steps=10,
                                                          max_consecutive_nonfinite=3, checkpoint_every=0))
    trainer = Trainer(cfg)
    real = trainer.meta.compute_losses
    calls = {"n": 0}

    def poisoned(batch, teacher_temp):
        calls["n"] += 1
        loss, stats = real(batch, teacher_temp)
        return (loss * float("nan"), stats) if calls["n"] > 1 else (loss, stats)

    monkeypatch.setattr(trainer.meta, "compute_losses", poisoned)
    snapshot = {}

    def after_first_step(*args):
        if not snapshot:
            snapshot.update({k: v.clone() for k, v in trainer.meta.state_dict().items()})

    with pytest.raises(NonFiniteLossError, match="3 consecutive steps had a non-finite loss"):
        monkeypatch.setattr(trainer.monitor, "maybe_run", lambda model, step: after_first_step())
        trainer.fit()
    assert trainer.state.step == 4 and trainer.state.skipped_steps == 3
    for key, value in trainer.meta.state_dict().items():
        if "center" not in key:
            assert torch.equal(value, snapshot[key]), f"{key} changed during a skipped step"
    assert (tmp_path / "nan" / "checkpoints" / "step_00000004").is_dir()
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "nan")] == [0, 1, 2, 3]


def test_monitor_export_on_request_and_highres_phase(image_folder, tmp_path):
    """k-NN monitor metrics in the log; `python -m pretrain export`; a high-res run that starts from the export with
    its position embeddings resized to the larger grid."""
    monitor = {"monitor.train": str(image_folder), "monitor.val": str(image_folder), "monitor.every_n_steps": 2,
               "monitor.image_size": 32, "monitor.k": "[5]", "monitor.num_workers": 0, "monitor.batch_size": 16}
    finish(run_cli(tiny_overrides(image_folder, tmp_path, "base", steps=2, **monitor)))
    records = read_metrics(tmp_path / "base")
    assert 0.0 <= records[1]["knn/top1_k5"] <= 100.0 and "total_loss" in records[1]

    shutil.rmtree(tmp_path / "base" / "export")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pretrain", "export", str(tmp_path / "base"), "--step", "2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    exported = load_file(tmp_path / "base" / "export" / "teacher_backbone.safetensors")
    # evaluation takes the run directory as its weights and reads the architecture from the export's model.json
    evaluated = build_eval_backbone(BackboneConfig(weights=str(tmp_path / "base")))
    assert (len(evaluated.blocks), evaluated.patch_size, evaluated.embed_dim) == (2, 8, 192)
    torch.testing.assert_close(evaluated.state_dict()["cls_token"], exported["cls_token"])
    # curation embeds with the same run
    embedder = build_embedder(EmbedConfig(kind="dinov2", weights=str(tmp_path / "base"), image_size=32))
    vectors = embedder.embed_batch(torch.stack([embedder.transform(Image.open(p)) for p in
                                                sorted(image_folder.glob("class0/*.jpg"))[:3]]))
    assert vectors.shape == (3, 192) and np.allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=1e-2)
    assert exported["pos_embed"].shape == (1, 1 + 6 * 6, 192)  # cpu_tiny's grid: img_size 48 / patch 8

    overrides = tiny_overrides(image_folder, tmp_path, "highres", steps=2, init_weights=str(tmp_path / "base"))
    overrides += ["model.img_size=96", "data.multicrop.global_crops_size=48", "data.multicrop.local_crops_size=24"]
    trainer = Trainer(load_config(TrainConfig, CONFIG, overrides))
    teacher = trainer.meta.teacher["backbone"].state_dict()
    assert teacher["pos_embed"].shape == (1, 1 + 12 * 12, 192)
    torch.testing.assert_close(teacher["blocks.1.attn.qkv.weight"], exported["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(teacher["pos_embed"][:, 0], exported["pos_embed"][:, 0])  # the CLS position is kept
    trainer.fit()
    assert np.isfinite(read_metrics(tmp_path / "highres")[0]["total_loss"])


def test_bf16_autocast_with_activation_checkpointing_trains(image_folder, tmp_path):
    finish(run_cli(tiny_overrides(image_folder, tmp_path, "bf16", steps=2, precision="bf16",
                                  activation_checkpointing="true", checkpoint_every=0)))
    records = read_metrics(tmp_path / "bf16")
    assert all(np.isfinite(r["total_loss"]) for r in records) and records[-1]["peak_memory_gib"] > 0


def test_single_process_bf16_computes_in_bf16(image_folder, tmp_path):
    """One process is left unsharded (no MixedPrecisionPolicy), so precision=bf16 must come from autocast."""
    trainer = Trainer(load_config(TrainConfig, CONFIG, tiny_overrides(image_folder, tmp_path, "amp", precision="bf16")))
    layer = trainer.meta.student["backbone"].blocks[0].attn.qkv
    with trainer.autocast():
        assert layer(torch.randn(2, 192)).dtype == torch.bfloat16
    fp32 = Trainer(load_config(TrainConfig, CONFIG, tiny_overrides(image_folder, tmp_path, "fp32")))
    with fp32.autocast():
        assert fp32.meta.student["backbone"].blocks[0].attn.qkv(torch.randn(2, 192)).dtype == torch.float32


def test_batched_photometric_parameters_stay_on_the_host():
    """The crops go to the training device, their photometric parameters do not (apply_photometric plans on the
    host: a device copy would be a blocking copy back every step)."""
    from pretrain.train import _to_device

    batch = {"global_crops": torch.zeros(2, 3, 4, 4), "global_photometric": torch.ones(2, 16),
             "local_photometric": torch.ones(4, 16), "n_global_crops": 2}
    out = _to_device(batch, torch.device("meta"))
    assert out["global_crops"].device.type == "meta" and out["n_global_crops"] == 2
    assert out["global_photometric"].device.type == out["local_photometric"].device.type == "cpu"
