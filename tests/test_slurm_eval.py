"""Evaluation as a Slurm job: `python -m slurm submit evaluation knn ...` on the local cluster writes the results
of the in-process `python -m evaluation knn ...` on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.arch=vit_tiny", "model.patch_size=16", "model.img_size=64", "transform.resize_size=64",
        "transform.crop_size=64", "features.num_workers=0", "features.batch_size=8", "features.cache_dir=",
        "knn.ks=[3,5]"]

pytestmark = pytest.mark.slurm


def image_folder(root: Path, per_class: int, seed: int) -> Path:
    """2 classes of small JPEGs (a bright square in the red or the green channel)."""
    rng = np.random.default_rng(seed)
    for label in range(2):
        (root / f"class{label}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(64, 64, 3), dtype=np.uint8)
            x, y = rng.integers(0, 32, size=2)
            pixels[y : y + 32, x : x + 32, label] = 220
            Image.fromarray(pixels).save(root / f"class{label}" / f"{i}.jpg", quality=90)
    return root


@pytest.mark.timeout(600)
def test_evaluation_job_writes_the_results_of_the_in_process_cli(slurm_cluster, tmp_path, one_thread):
    from evaluation.__main__ import main

    train, val = image_folder(tmp_path / "train", 6, 0), image_folder(tmp_path / "val", 3, 1)
    data = ["--weights", "random", "--train", str(train), "--val", str(val), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    job = subprocess.run([sys.executable, "-m", "slurm", "submit", "evaluation", "knn", *data,
                          "--out", str(tmp_path / "job"), "--profile", "local", "--tasks-per-node", "1",
                          "--wait", "--wait-timeout", "400"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=450)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "1 of 1 jobs completed" in job.stdout, job.stdout
    logs = list((tmp_path / "job" / "slurm").glob("*/*_0_log.out"))
    assert len(logs) == 1 and "## k-NN" in logs[0].read_text()  # the job ran the evaluation CLI (its table)

    assert main(["knn", *data, "--out", str(tmp_path / "inprocess")]) == 0
    in_job = json.loads((tmp_path / "job" / "results_knn.json").read_text())
    in_process = json.loads((tmp_path / "inprocess" / "results_knn.json").read_text())
    assert (in_job["meta"]["n_train"], in_job["meta"]["n_val"]) == (12, 6)
    assert in_job["meta"]["world_size"] == 1
    assert in_job["metrics"] and in_job["metrics"] == in_process["metrics"]
