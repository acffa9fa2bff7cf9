"""The local single-node Slurm (`python -m slurm local-cluster`) runs real batch jobs and job steps, and cluster
profiles are strict configs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dinoforge.config import ConfigError
from slurm.profile import load_profile

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_sbatch_and_srun_run_on_the_local_cluster(slurm_cluster, tmp_path):
    out = tmp_path / "job-%j.out"
    wrap = "hostname; echo on-$SLURM_JOB_NODELIST"
    batch = subprocess.run(["sbatch", "--wait", "--parsable", "-o", str(out), "--wrap", wrap],
                           capture_output=True, text=True, timeout=120)
    assert batch.returncode == 0, batch.stderr
    job = batch.stdout.strip()
    assert Path(str(out).replace("%j", job)).read_text().split()[-1] == "on-localhost"
    step = subprocess.run(["srun", "-n", "2", "-l", "printenv", "SLURM_PROCID"], capture_output=True, text=True,
                          timeout=120)
    assert step.returncode == 0, step.stderr
    assert sorted(line.split(":")[-1].strip() for line in step.stdout.splitlines()) == ["0", "1"]


@pytest.mark.slurm
@pytest.mark.timeout(60)
def test_status_shows_the_daemons_and_the_partition(slurm_cluster):
    command = ["local-cluster", "status", "--root", str(slurm_cluster.root)]
    result = subprocess.run([sys.executable, "-m", "slurm", *command],
                            cwd=REPO, capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    assert "slurmd: running" in result.stdout and "local*" in result.stdout
    assert f"SLURM_CONF={slurm_cluster.conf}" in result.stdout


def test_profiles_are_strict_and_flags_override_them():
    profile = load_profile("gpu_cluster", ["nodes=4", "partition=big"])
    assert (profile.nodes, profile.partition, profile.ntasks_per_node) == (4, "big", 8)
    assert load_profile("local").ntasks_per_node == 1
    with pytest.raises(ConfigError, match="gpus_per_nod"):
        load_profile("local", ["gpus_per_nod=2"])
    with pytest.raises(ConfigError, match="unknown cluster profile 'nowhere'"):
        load_profile("nowhere")


def test_help_is_fast_and_imports_no_torch():
    code = "import sys\nfrom slurm.__main__ import main\ntry:\n    main(['submit', '--help'])\nexcept SystemExit:\n" \
           "    pass\nassert 'torch' not in sys.modules and 'submitit' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_curation_plan_runs_partitioned_steps_as_arrays_chained_in_order(tmp_path):
    from slurm.submit import plan

    config = str(REPO / "configs" / "curate" / "cpu_demo.yaml")
    run_dir, specs = plan("curate", [config, "partitions=3", f"runs_root={tmp_path}"])
    names = [spec.name for spec in specs]
    assert names[:3] == ["curate-ingest", "curate-embed", "curate-embed-close"] and names[-1] == "curate-report"
    embed = specs[1]
    assert [argv[-2:] for argv in embed.argvs] == [["--partitions", str(p)] for p in range(3)]
    assert all(spec.after == ((i - 1,) if i else ()) for i, spec in enumerate(specs))

    # one failed array task, rerun alone: that partition, then the closing task
    _, (task, close) = plan("curate", ["embed", config, "partitions=3", f"runs_root={tmp_path}", "--partitions", "1"])
    assert task.argvs == [["embed", config, "partitions=3", f"runs_root={tmp_path}", "--partitions", "1"]]
    assert close.argvs == [["embed", config, "partitions=3", f"runs_root={tmp_path}"]] and close.after == (0,)
    with pytest.raises(ValueError, match="--partitions applies to one partitioned step"):
        plan("curate", ["cluster", config, f"runs_root={tmp_path}", "--partitions", "1"])


def test_a_zombie_daemon_counts_as_stopped(tmp_path):
    """A daemon that exited but was never reaped still answers signal 0; `stop` and `running` must not wait on it."""
    from slurm.local_cluster import LocalCluster, is_zombie

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while not is_zombie(child.pid):  # exited, not yet reaped: we have not called wait()
            assert time.monotonic() < deadline, "the child neither exited nor became a zombie"
            time.sleep(0.05)
        cluster = LocalCluster(tmp_path)
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "slurmd.pid").write_text(f"{child.pid}\n")
        assert cluster.running()["slurmd"] is None
        started = time.monotonic()
        cluster.stop(timeout=20)
        assert time.monotonic() - started < 5 and not (tmp_path / "run" / "slurmd.pid").exists()
    finally:
        child.wait(timeout=10)
    assert not is_zombie(os.getpid())
