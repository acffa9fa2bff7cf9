"""`python -m slurm submit STAGE ... --local`: the jobs' code path in this process, no Slurm; it gives what
`python -m STAGE` gives (pretraining's losses, curation's manifest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_slurm_curate import make_pool, manifest, write_config
from test_slurm_submit import CONFIG, losses, tiny_overrides

from slurm.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def stage_cli(*args: str) -> None:
    """`python -m ARGS` as a plain process (one thread, no Slurm)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SLURM_CONF", None)
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture
def no_slurm_env(monkeypatch):
    """In a job's environment init_distributed would read Slurm's ranks: --local must not depend on it."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(REPO)


@pytest.mark.timeout(300)
def test_local_pretrain_matches_pretrain_cli(image_folder, tmp_path, one_thread, no_slurm_env):
    assert main(["submit", "pretrain", str(CONFIG), *tiny_overrides(image_folder, tmp_path, "local", steps=3),
                 "--local"]) == 0
    stage_cli("pretrain", "train", str(CONFIG), *tiny_overrides(image_folder, tmp_path, "cli", steps=3))
    local, cli = losses(tmp_path / "local"), losses(tmp_path / "cli")
    assert local.keys() == cli.keys() == {0, 1, 2}
    for step in local:
        np.testing.assert_allclose(local[step], cli[step], rtol=1e-6, err_msg=f"step {step}")


@pytest.mark.timeout(300)
def test_local_curate_matches_curate_cli(tmp_path, one_thread, no_slurm_env):
    pool = tmp_path / "pool"
    make_pool(pool)
    config = write_config(tmp_path / "tiny.yaml", pool, tmp_path / "runs")
    reference = write_config(tmp_path / "reference.yaml", pool, tmp_path / "reference")
    assert main(["submit", "curate", str(config), "--local"]) == 0  # every step; partitioned ones task by task
    stage_cli("curate", "run", str(reference))
    run_dir = tmp_path / "runs" / "tiny"
    for step in ("ingest", "embed", "dedup", "cluster", "retrieve", "shard", "report"):
        assert (run_dir / f"_SUCCESS.{step}").is_file(), step
    assert manifest(run_dir) == manifest(tmp_path / "reference" / "tiny")


def test_a_finished_job_ignores_a_late_usr2(monkeypatch):
    """A time-limit or preemption USR2 that lands after the stage has finished (seen on a loaded machine: the run
    exported, then `srun: error: task 0: User defined signal 2` and the job FAILED) must not kill the task."""
    import signal

    from slurm import submit

    calls = []
    monkeypatch.setattr(submit, "stage_main", lambda stage: lambda argv: calls.append(argv) or 0)
    previous = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        assert submit.StageJob("pretrain", ["train", "x.yaml"], os.getcwd())() == 0
        os.kill(os.getpid(), signal.SIGUSR2)  # the default action would end this process
        assert calls == [["train", "x.yaml"]]
    finally:
        signal.signal(signal.SIGUSR2, previous)
