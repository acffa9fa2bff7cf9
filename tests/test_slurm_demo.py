"""`make demo SLURM=1` at the reduced size of tests/test_demo.py: the target starts a local Slurm cluster, runs every
stage with `python -m slurm submit ... --wait` as jobs on it, ends with the summary, and stops the cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_demo import REDUCED, REPO, WAIT_S

from slurm.local_cluster import LocalCluster, missing_requirements

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_demo_runs_its_stages_as_slurm_jobs(tmp_path):
    reason = missing_requirements()
    if reason:
        pytest.skip(f"local Slurm cluster: {reason}")
    root = Path(tempfile.mkdtemp(prefix="dinoforge-slurm-"))  # short: munge's socket path must fit in 108 bytes
    demo = tmp_path / "demo"
    env = {**os.environ, "DINOFORGE_SLURM_DIR": str(root)}
    env.pop("SLURM_CONF", None)  # the target points the clients at its own cluster
    try:
        proc = subprocess.run(["make", "--no-print-directory", "demo-run", "SLURM=1", f"PY={sys.executable}",
                               f"DEMO={demo}", *REDUCED], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=WAIT_S)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert not any(LocalCluster(root).running().values()), "the cluster still runs after the demo"
    finally:
        LocalCluster(root).stop()
        shutil.rmtree(root, ignore_errors=True)
    for command in ("-m slurm submit curate run", "-m slurm submit pretrain train", "-m slurm submit pretrain distill",
                    "-m slurm submit evaluation knn", "-m slurm submit pretrain release"):
        assert command in proc.stdout, f"make demo SLURM=1 did not run `{command}`"
    # each stage left its Slurm job folders (RUN_DIR/slurm/JOBID) beside its artefacts
    for run in (demo / "curate" / "demo", demo / "teacher", demo / "distill", demo / "eval" / "teacher"):
        assert list((run / "slurm").iterdir()), f"no Slurm job folder under {run}"
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["curation"]["images_in"] > 0 and len(summary["releases"]) == 2
    assert all(m["knn_top1"] is not None for m in summary["models"])
