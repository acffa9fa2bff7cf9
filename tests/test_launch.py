"""The launch environment: one precedence (torchrun, then Slurm, then a single process) for every stage, and a plain
`srun -n 2` of the training CLI forms one job of two ranks (variables set by hand, two real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinoforge.launch import LaunchError, LaunchPlace, first_host, launch_place

REPO = Path(__file__).resolve().parents[1]


def test_a_single_process_without_launcher_variables():
    assert launch_place({}) == LaunchPlace(0, 1, 0, None, None, "single process")


def test_torchrun_variables_win_inside_a_slurm_allocation():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    assert launch_place(env) == LaunchPlace(3, 4, 1, "n1", 29500, "torchrun")


def test_slurm_tasks_form_one_job_meeting_at_the_first_node():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    place = launch_place(env)
    assert place == LaunchPlace(5, 8, 1, "gpu07", 20000 + 1234, "slurm")
    assert launch_place({**env, "SLURM_PROCID": "0"}).master_port == place.master_port  # every task, same address
    exported = launch_place({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert (exported.master_addr, exported.master_port) == ("10.0.0.1", 29400)
    assert launch_place({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == LaunchPlace(launcher="slurm")
    # a one-task step inside a larger allocation is one process, not rank 0 of the allocation's tasks
    assert launch_place({**env, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) == LaunchPlace(0, 1, 1,
                                                                                                launcher="slurm")


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("gpu[03-05,07],cpu1", "gpu03"),
                                           ("a-b[9]", "a-b9"), ("x[10,2]", "x10")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("env,match", [
    ({"RANK": "0"}, "WORLD_SIZE is missing"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR, MASTER_PORT is not"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n"}, "outside"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "needs MASTER_ADDR, SLURM_JOB_NODELIST"),
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "not an integer"),
])
def test_bad_launcher_variables_are_named(env, match):
    with pytest.raises(LaunchError, match=match):
        launch_place(env)


JOIN = """
import json, sys
from dinoforge.collectives import all_reduce_sum
from dinoforge.launch import destroy_distributed, init_distributed
import torch
env = init_distributed("gloo")
total = all_reduce_sum(torch.tensor([float(env.rank + 1)]))
print(json.dumps({"rank": env.rank, "world": env.world_size, "local": env.local_rank, "sum": total.item()}))
destroy_distributed()
"""


@pytest.mark.timeout(120)
def test_two_srun_tasks_without_torchrun_form_one_job(tmp_path):
    """What `srun -n 2 python ...` sets, by hand: two processes join one group of two ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    procs = [subprocess.Popen(
        [sys.executable, "-c", JOIN], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**clean, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
             "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port)})
        for rank in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted((r["rank"], r["world"], r["local"]) for r in results) == [(0, 2, 0), (1, 2, 1)]
    assert all(r["sum"] == 3.0 for r in results)  # 1 + 2: one job, not two ranks 0 of 1
