"""Stages submitted through submitit to the local Slurm: a 2-task CPU pretraining job (ranks from Slurm through
dinoforge.launch, gloo) gives the same losses as 2 processes under torchrun, and a requeued job resumes exactly.

No test races the job: each interruption happens while the job is held before a known step (`step_gate_dir`,
pretrain.step_gate), and the test lets it go only once the requeued attempt stands at the same gate again (so the
earlier attempt is gone)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pretrain.step_gate import at_path, hold_path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pretrain" / "cpu_tiny.yaml"
LOSS_KEYS = ("total_loss", "dino_loss", "ibot_loss")

pytestmark = pytest.mark.slurm


def tiny_overrides(data: Path, out: Path, name: str, steps: int = 4, **extra: object) -> list[str]:
    """tests/test_train.py's tiny recipe, 4 images per rank, KoLeo off (a per-process statistic)."""
    values = {
        "name": name, "output_dir": str(out), "total_steps": steps, "log_every": 1, "checkpoint_every": 0,
        "data.dataset": str(data), "data.batch_size_per_rank": 4, "data.num_workers": 0,
        "data.multicrop.global_crops_size": 32, "data.multicrop.local_crops_size": 16,
        "data.multicrop.local_crops_number": 2, "model.depth": 2, "loss.koleo_loss_weight": 0.0,
        "loss.dino_head.out_dim": 64, "loss.dino_head.hidden_dim": 32, "loss.dino_head.bottleneck_dim": 16,
        "optim.warmup_steps": 2, "optim.warmup_teacher_temp_steps": 2, "optim.freeze_last_layer_steps": 1,
        "peak_tflops": 1.0, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def losses(run_dir: Path) -> dict[int, tuple[float, ...]]:
    from pretrain.metrics import read_metrics

    return {int(r["step"]): tuple(r[k] for k in LOSS_KEYS) for r in read_metrics(run_dir)}


def torchrun(overrides: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SLURM_CONF", None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "pretrain", "train", str(CONFIG), *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def submit_training(overrides: list[str], **profile_values):
    from slurm import submit
    from slurm.profile import load_profile

    profile = load_profile("local", [f"{k}={v}" for k, v in {"tasks_per_node": 2, **profile_values}.items()])
    os.environ["OMP_NUM_THREADS"] = "1"  # exported to the job by sbatch
    folder, jobs = submit.submit("pretrain", [str(CONFIG), *overrides], profile, cwd=str(REPO))
    (job,) = jobs[0]
    return submit, folder, job


def scontrol_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith(f"{name}=")), "")


def latest_step(run_dir: Path) -> int:
    """The step of the latest complete checkpoint (-1 before the first)."""
    latest = run_dir / "checkpoints" / "latest"
    text = latest.read_text().strip() if latest.is_file() else ""
    return int(text.rsplit("_", 1)[1]) if text.startswith("step_") else -1


def wait_for(condition, job, submit, timeout: float, what: str) -> None:
    """Poll `condition()` every 0.2 s until true; the job must stay alive or be in requeue (checked every 2 s:
    scontrol is a process, and the machine has 2 cores). The timeout only bounds a job that hangs."""
    deadline = time.monotonic() + timeout
    polls = 0
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s\n{submit.log_tail(job)}"
        polls += 1
        if polls % 10 == 0:
            state = submit.job_state(job)
            assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"), submit.log_tail(job)
        time.sleep(0.2)


def gates(folder: Path, *steps: int) -> Path:
    """A gate folder holding a run before each of `steps`."""
    folder.mkdir()
    for step in steps:
        hold_path(folder, step).touch()
    return folder


def held_at(gate_dir: Path, step: int, job, submit, timeout: float = 400) -> None:
    """Wait until the job stands before `step` (its checkpoint of `step` complete), then forget the sign."""
    wait_for(at_path(gate_dir, step).exists, job, submit, timeout, f"the job held before step {step}")
    at_path(gate_dir, step).unlink()


def release_after_requeue(gate_dir: Path, step: int, job, submit, resumes: int) -> None:
    """Once the requeued attempt has resumed (its `resumes`-th resume) and stands at the gate of `step` again, the
    interrupted attempt is gone: let the job go on."""
    log = job.paths.stderr
    wait_for(lambda: at_path(gate_dir, step).exists() and log.read_text().count("resumed from step") >= resumes,
             job, submit, 400, f"the requeued job back before step {step}")
    assert f"resumed from step {step} " in log.read_text(), submit.log_tail(job)
    hold_path(gate_dir, step).unlink()


@pytest.mark.timeout(900)
def test_preempted_job_requeues_and_resumes_exactly(slurm_cluster, image_folder, tmp_path):
    """A 2-task job (two gloo ranks of one process group) interrupted twice: `scontrol requeue` before step 4 (an
    operator's requeue: the job is killed and queued again), then USR2 before step 8 (what Slurm sends before
    preempting; submitit requeues the job). Each time it resumes from the checkpoint of that step, and it ends at its
    step count with the losses of an uninterrupted 2-process torchrun run."""
    common = {"total_steps": 12, "checkpoint_every": 1}
    gate_dir = gates(tmp_path / "gates", 4, 8)
    submit, folder, job = submit_training(tiny_overrides(image_folder, tmp_path, "preempted", step_gate_dir=gate_dir,
                                                         **common))
    assert folder == tmp_path / "preempted" / "slurm" and job.paths.folder == folder / job.job_id
    run_dir = tmp_path / "preempted"
    held_at(gate_dir, 4, job, submit)
    assert latest_step(run_dir) == 4
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=30)
    # held back cred_expire+1 s (11 s here), then run again: resumed from step 4, held there again
    release_after_requeue(gate_dir, 4, job, submit, resumes=1)
    held_at(gate_dir, 8, job, submit)
    assert latest_step(run_dir) == 8
    # USR2 alone: submitit's `job._interrupt()` sends SIGTERM just before it, and slurmstepd's delivery of that SIGTERM
    # to the step's processes can reach the `scontrol requeue` that the USR2 handler has just started
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)
    release_after_requeue(gate_dir, 8, job, submit, resumes=2)
    states = submit.wait([job], timeout=500)
    assert states == {job.job_id: "COMPLETED"}, submit.log_tail(job)
    assert int(scontrol_field(job.job_id, "Restarts")) == 2
    assert "global_rank=1(2)" in job.paths.folder.joinpath(f"{job.job_id}_1_log.out").read_text()  # one job, 2 ranks
    log = job.paths.stderr.read_text()  # appended to by each attempt
    assert log.count("resumed from step") == 2, submit.log_tail(job)
    torchrun(tiny_overrides(image_folder, tmp_path, "straight", **common))
    preempted, straight = losses(run_dir), losses(tmp_path / "straight")
    assert preempted.keys() == straight.keys() == set(range(common["total_steps"]))
    for step in preempted:
        np.testing.assert_allclose(preempted[step], straight[step], rtol=1e-6, err_msg=f"step {step}")


def train_in_process(overrides: list[str], log: Path) -> subprocess.Popen:
    """`python -m pretrain train` as one plain process (no Slurm, no torchrun), started and left running."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SLURM_CONF", None)
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "pretrain", "train", str(CONFIG), *overrides], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)


# Slurm checks limits every 30 s, so USR2 comes 25 to 55 s after a 1-minute job starts (`signal_delay_s=5` before the
# limit, plus up to one check's period). The job is held before step LIMIT_GATE until then, however fast it runs.
TIME_LIMITED_STEPS = 20
LIMIT_GATE = 10


@pytest.mark.timeout(900)
def test_time_limit_requeues_until_done_and_max_requeues_bounds_it(slurm_cluster, image_folder, tmp_path):
    """`--timeout-min 1`: Slurm signals the job before its limit (while it is held before step 10), submitit requeues
    it, it resumes from that checkpoint and ends at its step count with the losses of an uninterrupted run; with
    `max_requeues=0` the first time-out ends the job, saying why."""
    steps = TIME_LIMITED_STEPS
    common = {"total_steps": steps, "checkpoint_every": 1}
    limits = {"tasks_per_node": 1, "timeout_min": 1, "signal_delay_s": 5}
    gate_dir = gates(tmp_path / "gates", LIMIT_GATE)
    submit, _, job = submit_training(tiny_overrides(image_folder, tmp_path, "limited", step_gate_dir=gate_dir,
                                                    **common), max_requeues=8, **limits)
    # held before step 2 until its time runs out, never released: the first time-out must end it
    bounded_gates = gates(tmp_path / "bounded_gates", 2)
    _, _, bounded = submit_training(tiny_overrides(image_folder, tmp_path, "bounded", step_gate_dir=bounded_gates,
                                                   total_steps=4, checkpoint_every=1), max_requeues=0, **limits)
    straight_log = tmp_path / "straight.log"
    straight = train_in_process(tiny_overrides(image_folder, tmp_path, "straight", **common), straight_log)
    try:
        # released once the requeued attempt has resumed (the timed-out one is gone), wherever the first attempt
        # stood when its time ran out: at the gate, or before it on a machine slower than 25 s for 10 steps
        wait_for(lambda: job.paths.stderr.exists() and "resumed from step" in job.paths.stderr.read_text(), job,
                 submit, 400, "the job requeued after its time limit")
        hold_path(gate_dir, LIMIT_GATE).unlink()
        states = submit.wait([job, bounded], timeout=700)
        assert straight.wait(timeout=300) == 0, straight_log.read_text()[-3000:]
    finally:
        if straight.poll() is None:
            straight.kill()
            straight.wait(timeout=30)
    assert states[bounded.job_id] == "FAILED", submit.log_tail(bounded)
    assert "Job not requeued because: timed-out too many times" in bounded.paths.stderr.read_text()
    assert int(scontrol_field(bounded.job_id, "Restarts")) == 0
    assert latest_step(tmp_path / "bounded") <= 2  # it never passed its gate
    assert states[job.job_id] == "COMPLETED", submit.log_tail(job)
    assert int(scontrol_field(job.job_id, "Restarts")) >= 1
    log = job.paths.stderr.read_text()
    assert "this job is timed-out" in log and "resumed from step" in log, submit.log_tail(job)
    limited, uninterrupted = losses(tmp_path / "limited"), losses(tmp_path / "straight")
    assert limited.keys() == uninterrupted.keys() == set(range(steps))
    for step in limited:
        np.testing.assert_allclose(limited[step], uninterrupted[step], rtol=1e-6, err_msg=f"step {step}")


@pytest.mark.timeout(900)
def test_requeued_distillation_job_resumes_every_student_exactly(slurm_cluster, image_folder, tmp_path):
    """`python -m slurm submit pretrain distill ...` requeued (`scontrol requeue`) while held before step 3: both
    students resume from their step-3 checkpoints and end with the losses of an uninterrupted in-process run."""
    from test_distill import DISTILL, STUDENT_A, STUDENT_B, student_losses, tiny

    from slurm import submit
    from slurm.profile import load_profile

    teacher = train_in_process([*tiny(image_folder, tmp_path, "teacher"), "model.depth=2",
                                "loss.dino_head.out_dim=64", "loss.dino_head.hidden_dim=32",
                                "loss.dino_head.bottleneck_dim=16", "optim.warmup_teacher_temp_steps=1",
                                "optim.freeze_last_layer_steps=1"], tmp_path / "teacher.log")
    assert teacher.wait(timeout=300) == 0, (tmp_path / "teacher.log").read_text()[-3000:]
    common = [f"teacher.weights={tmp_path / 'teacher'}", f"students=[{STUDENT_A},{STUDENT_B}]"]
    gate_dir = gates(tmp_path / "gates", 3)
    profile = load_profile("local", ["tasks_per_node=1"])
    os.environ["OMP_NUM_THREADS"] = "1"
    _, jobs = submit.submit("pretrain", ["distill", str(DISTILL), *tiny(image_folder, tmp_path, "requeued", steps=6,
                                                                       checkpoint_every=1, step_gate_dir=gate_dir),
                                         *common], profile, cwd=str(REPO))
    (job,) = jobs[0]
    held_at(gate_dir, 3, job, submit)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=30)
    release_after_requeue(gate_dir, 3, job, submit, resumes=1)
    assert submit.wait([job], timeout=500) == {job.job_id: "COMPLETED"}, submit.log_tail(job)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SLURM_CONF", None)
    straight = subprocess.run([sys.executable, "-m", "pretrain", "distill", str(DISTILL),
                               *tiny(image_folder, tmp_path, "straight", steps=6, checkpoint_every=1), *common],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for student in ("a", "b"):
        requeued, uninterrupted = (student_losses(tmp_path / name, student) for name in ("requeued", "straight"))
        assert requeued.keys() == uninterrupted.keys() == set(range(6))
        for step in requeued:
            np.testing.assert_allclose(requeued[step], uninterrupted[step], rtol=1e-6, err_msg=f"{student} {step}")
