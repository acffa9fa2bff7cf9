"""Distillation (`python -m pretrain distill`): teachers from a run, an export or a bare file; both objectives;
several students equal to one-student runs; resume; 2 processes against 1; the teacher at a higher resolution;
one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dinoforge.config import ConfigError, load_config
from dinoforge.models.loading import load_backbone
from evaluation.config import BackboneConfig
from pretrain.distill import build_distillation
from pretrain.distill_config import DistillConfig
from pretrain.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain" / "cpu_tiny.yaml"
DISTILL = REPO / "configs" / "distill" / "cpu_tiny.yaml"
STUDENT_A = "{name: a, model: {arch: vit_tiny, depth: 1, patch_size: 8, img_size: 32, layerscale: 1.0}, " \
            "loss: {dino_head: {hidden_dim: 32, bottleneck_dim: 16}}}"
STUDENT_B = "{name: b, base_lr: 0.002, model: {arch: vit_tiny, depth: 2, patch_size: 16, img_size: 32, " \
            "layerscale: 1.0}, loss: {dino_head: {hidden_dim: 24, bottleneck_dim: 8}, koleo_loss_weight: 0}}"


def run(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    out = subprocess.run([*launcher, "-m", "pretrain", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    if check:
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def tiny(data: Path, out: Path, name: str, steps: int = 4, **extra: object) -> list[str]:
    values = {
        "name": name, "output_dir": str(out), "total_steps": steps, "log_every": 1, "checkpoint_every": 2,
        "data.dataset": str(data), "data.batch_size_per_rank": 8, "data.num_workers": 0,
        "data.multicrop.global_crops_size": 32, "data.multicrop.local_crops_size": 16,
        "data.multicrop.local_crops_number": 2, "optim.warmup_steps": 1, "peak_tflops": 1.0, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def teacher_run(image_folder, tmp_path_factory) -> Path:
    """A 2-block ViT-Ti/8 pretrained for 4 steps, with 64-prototype heads: a teacher in seconds."""
    out = tmp_path_factory.mktemp("teacher")
    run(["train", str(PRETRAIN), *tiny(image_folder, out, "teacher", **{
        "model.depth": 2, "loss.dino_head.out_dim": 64, "loss.dino_head.hidden_dim": 32,
        "loss.dino_head.bottleneck_dim": 16, "optim.warmup_teacher_temp_steps": 1,
        "optim.freeze_last_layer_steps": 1})])
    return out / "teacher"


def distill_args(data: Path, out: Path, name: str, teacher: Path, students: list[str], **extra: object) -> list[str]:
    return ["distill", str(DISTILL), *tiny(data, out, name, **{"teacher.weights": str(teacher),
                                                              "students": "[" + ",".join(students) + "]", **extra})]


def student_losses(run_dir: Path, student: str) -> dict[int, tuple[float, ...]]:
    keys = ("total_loss", "dino_loss", "ibot_loss")
    return {int(r["step"]): tuple(r.get(k, np.nan) for k in keys)
            for r in read_metrics(run_dir / "students" / student) if "total_loss" in r}


def test_two_students_equal_two_one_student_runs(image_folder, teacher_run, tmp_path):
    """One teacher pass shared by two students changes nothing for either: the same losses every step and the same
    exported EMA as each student alone (same seeds)."""
    run(distill_args(image_folder, tmp_path, "both", teacher_run, [STUDENT_A, STUDENT_B]))
    run(distill_args(image_folder, tmp_path, "a", teacher_run, [STUDENT_A]))
    run(distill_args(image_folder, tmp_path, "b", teacher_run, [STUDENT_B]))
    for student in ("a", "b"):
        together, alone = student_losses(tmp_path / "both", student), student_losses(tmp_path / student, student)
        assert together.keys() == alone.keys() == {0, 1, 2, 3}
        for step in together:
            np.testing.assert_allclose(together[step], alone[step], rtol=1e-5, err_msg=f"{student} step {step}")
        first, last = together[0], together[3]
        assert last[0] < first[0], f"student {student} did not learn: {first} -> {last}"
        exported = load_file(tmp_path / "both" / "students" / student / "export" / "teacher_backbone.safetensors")
        reference = load_file(tmp_path / student / "students" / student / "export" / "teacher_backbone.safetensors")
        assert exported.keys() == reference.keys()
        for key in exported:
            torch.testing.assert_close(exported[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    # each student's export is a pretrain export: evaluation builds it from its model.json
    b = load_backbone(BackboneConfig(weights=str(tmp_path / "both" / "students" / "b")))
    assert (len(b.blocks), b.patch_size) == (2, 16)
    teacher = load_file(teacher_run / "export" / "teacher_backbone.safetensors")
    assert len({k.split(".")[1] for k in teacher if k.startswith("blocks.")}) == 2  # the teacher was not changed
    # `pretrain plot RUN` draws each student's curves, log K from the teacher's prototypes its metrics note
    printed = run(["plot", str(tmp_path / "both")]).stdout.split()
    assert printed == [str(tmp_path / "both" / "students" / s / "curves.png") for s in ("a", "b")]
    assert all(Path(p).stat().st_size > 10_000 for p in printed)
    assert next(r for r in read_metrics(tmp_path / "both" / "students" / "a") if "prototypes" in r)["prototypes"] == 64


def test_features_objective_from_a_bare_weights_file_with_projection_and_resampled_grid(image_folder, teacher_run,
                                                                                         tmp_path):
    """A head-less teacher (a backbone file, architecture from teacher.* keys); a wider student (a warning, and a
    projection to the teacher's width) with another patch size (the teacher's 4x4 grid resampled to 2x2)."""
    wide = "{name: wide, model: {arch: vit_small, depth: 1, patch_size: 16, img_size: 32, layerscale: 1.0}, " \
           "features: {koleo_loss_weight: 0.1}}"
    teacher_file = teacher_run / "export" / "teacher_backbone.safetensors"
    out = run(distill_args(image_folder, tmp_path, "features", teacher_file, [wide], objective="features",
                           **{"teacher.arch": "vit_tiny", "teacher.depth": 2, "teacher.patch_size": 8,
                              "teacher.img_size": 48, "teacher.layerscale": 1.0}))
    assert "has more parameters than its teacher" in out.stdout + out.stderr
    records = [r for r in read_metrics(tmp_path / "features" / "students" / "wide") if "total_loss" in r]
    assert {"cls_loss", "patch_loss", "koleo_loss"} <= records[0].keys()
    assert records[-1]["cls_loss"] + records[-1]["patch_loss"] < records[0]["cls_loss"] + records[0]["patch_loss"]
    export = tmp_path / "features" / "students" / "wide" / "export"
    assert not (export / "teacher_heads.safetensors").exists()  # the projection is not a head
    assert json.loads((export / "model.json").read_text())["arch"] == "vit_small"


def test_resume_after_interruption_equals_uninterrupted_run(image_folder, teacher_run, tmp_path):
    run(distill_args(image_folder, tmp_path, "straight", teacher_run, [STUDENT_A, STUDENT_B], total_steps=6))
    run(distill_args(image_folder, tmp_path, "cut", teacher_run, [STUDENT_A, STUDENT_B], total_steps=6,
                     stop_after_steps=3))
    assert not (tmp_path / "cut" / "students" / "a" / "export").exists()
    # `pretrain export` of the interrupted run: every student's EMA at its checkpoint of step 2
    printed = run(["export", str(tmp_path / "cut"), "--step", "2"]).stdout.split()
    assert printed == [str(tmp_path / "cut" / "students" / s / "export" / "teacher_backbone.safetensors")
                       for s in ("a", "b")] and all(Path(p).is_file() for p in printed)
    shutil.rmtree(tmp_path / "cut" / "students" / "a" / "export")
    shutil.rmtree(tmp_path / "cut" / "students" / "b" / "export")
    run(distill_args(image_folder, tmp_path, "cut", teacher_run, [STUDENT_A, STUDENT_B], total_steps=6))
    for student in ("a", "b"):
        straight, cut = student_losses(tmp_path / "straight", student), student_losses(tmp_path / "cut", student)
        assert straight.keys() == cut.keys() == set(range(6))
        for step in straight:
            np.testing.assert_allclose(straight[step], cut[step], rtol=1e-5, err_msg=f"{student} step {step}")


@pytest.mark.slow
def test_two_processes_match_one(image_folder, teacher_run, tmp_path):
    """FSDP2 over 2 gloo processes (teacher and students sharded) with 4 images each == 1 process with 8; KoLeo is
    a per-process statistic, so it is off."""
    students = [STUDENT_A.replace("dino_head", "koleo_loss_weight: 0, dino_head"), STUDENT_B]
    run(distill_args(image_folder, tmp_path, "one", teacher_run, students, checkpoint_every=0))
    run(distill_args(image_folder, tmp_path, "two", teacher_run, students, checkpoint_every=0,
                     **{"data.batch_size_per_rank": 4}), nproc=2)
    for student in ("a", "b"):
        one, two = student_losses(tmp_path / "one", student), student_losses(tmp_path / "two", student)
        assert one.keys() == two.keys()
        for step in one:
            np.testing.assert_allclose(one[step], two[step], rtol=2e-5, err_msg=f"{student} step {step}")


def test_teacher_sees_global_crops_at_its_own_higher_resolution(image_folder, teacher_run, tmp_path):
    cfg = load_config(DistillConfig, DISTILL, tiny(image_folder, tmp_path, "hires", **{
        "teacher.weights": str(teacher_run), "teacher.crop_size": 64, "students": f"[{STUDENT_A}]"}))
    from dinoforge.launch import init_distributed

    models = build_distillation(cfg, init_distributed())
    assert models.data.multicrop.global_crops_size == 64 and models.data.mask_probability == 0.0
    seen = []
    teacher = models.module.teacher["backbone"]
    teacher.patch_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    side = torch.arange(64, dtype=torch.float32)
    wave = torch.sin(2 * torch.pi * side / 32)  # a smooth picture: its downsampling is close to 2x2 block means
    crops = (0.5 + 0.25 * (wave[:, None] + wave[None, :])).expand(4, 3, 64, 64).contiguous()
    out = models.shared_pass({"global_crops": crops, "local_crops": torch.rand(4, 3, 16, 16), "n_global_crops": 2},
                             0.05)
    assert seen == [torch.Size([4, 3, 64, 64])]
    assert out.student_globals.shape == (4, 3, 32, 32)
    torch.testing.assert_close(out.student_globals, torch.nn.functional.avg_pool2d(crops, 2), atol=0.03, rtol=0)
    assert out.patches.shape[1] == 8 * 8 and len(out.cls_targets) == 2


@pytest.mark.parametrize(("overrides", "message"), [
    (["teacher.weights=/nonexistent/teacher"], "teacher.weights=/nonexistent/teacher does not exist"),
    (["objective=mse"], "objective='mse' is not one of dino, features"),
    (["students=[]"], "students is empty"),
])
def test_bad_distillation_configs_are_one_line_errors(image_folder, tmp_path, overrides, message):
    args = ["distill", str(DISTILL), f"data.dataset={image_folder}", "teacher.weights=/tmp", *overrides]
    out = run(args, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]


def test_teacher_whose_keys_do_not_match_its_architecture_names_them(image_folder, teacher_run, tmp_path):
    teacher_file = teacher_run / "export" / "teacher_backbone.safetensors"
    out = run(distill_args(image_folder, tmp_path, "mismatch", teacher_file, [STUDENT_A], objective="features",
                           **{"teacher.arch": "vit_tiny", "teacher.depth": 3, "teacher.patch_size": 8}), check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "does not match its architecture" in out.stderr and "blocks.2" in out.stderr, out.stderr[-2000:]


def test_a_folder_without_weights_and_a_headless_teacher_for_dino_are_one_line_errors(image_folder, teacher_run,
                                                                                        tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run(distill_args(image_folder, tmp_path, "x", empty, [STUDENT_A]), check=False)
    assert out.returncode != 0 and "teacher.weights" in out.stderr and "Traceback" not in out.stderr, out.stderr
    bare = teacher_run / "export" / "teacher_backbone.safetensors"
    out = run(distill_args(image_folder, tmp_path, "y", bare, [STUDENT_A], **{"teacher.arch": "vit_tiny",
                                                                            "teacher.depth": 2,
                                                                            "teacher.patch_size": 8}), check=False)
    assert out.returncode != 0 and "objective=features" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_distillation_run_teaches_a_student(image_folder, teacher_run, tmp_path):
    """A student can teach: the run folder of a distillation (one student) is a teacher like a pretrain run."""
    run(distill_args(image_folder, tmp_path, "first", teacher_run, [STUDENT_A], total_steps=2))
    run(distill_args(image_folder, tmp_path, "second", tmp_path / "first", [STUDENT_B], total_steps=2))
    assert (tmp_path / "second" / "students" / "b" / "export" / "teacher_backbone.safetensors").is_file()
    with pytest.raises(ConfigError, match="students is empty"):
        load_config(DistillConfig, DISTILL, [f"data.dataset={image_folder}", "teacher.weights=x", "students=[]"])


def test_slurm_plans_a_distillation_from_the_stage_table(image_folder, tmp_path):
    """`python -m slurm submit pretrain distill ...` is an entry of pretrain's job table: one multi-task job running
    `python -m pretrain distill ...` for the run folder the config names."""
    from slurm import submit

    argv = ["distill", str(DISTILL), f"data.dataset={image_folder}", "teacher.weights=unused",
            f"output_dir={tmp_path}", "name=d"]
    run_dir, (spec,) = submit.plan("pretrain", argv)
    assert run_dir == tmp_path / "d" and spec.name == "distill-d" and spec.multi_task and spec.argvs == [argv]
    with pytest.raises(ConfigError, match="students is empty"):
        submit.plan("pretrain", [*argv, "students=[]"])
