"""`torchrun --nproc_per_node 2 -m evaluation knn ...` (gloo on CPU) reports what a single process reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_eval_support import imagenette_file_list, one_torch_thread

from evaluation.__main__ import main

REPO = Path(__file__).resolve().parents[1]
ARGS = ["model.arch=vit_tiny", "model.patch_size=16", "model.img_size=64", "transform.resize_size=72",
        "transform.crop_size=64", "features.num_workers=0", "features.batch_size=4", "features.cache_dir=",
        "knn.ks=[3,10]"]


def test_two_process_run_matches_single_process(tmp_path):
    # 3 train photos per class (30) and 1 val photo per class plus one (11): neither divisible by 2.
    train = imagenette_file_list(tmp_path / "train.txt", "train", 3)
    val_lines = imagenette_file_list(tmp_path / "val10.txt", "val", 1).read_text().splitlines()
    extra = imagenette_file_list(tmp_path / "extra.txt", "val", 1, offset=1).read_text().splitlines()[:1]
    val = tmp_path / "val.txt"
    val.write_text("\n".join(val_lines + extra) + "\n")
    data = ["--weights", "random", "--train", str(train), "--val", str(val), *ARGS]

    with one_torch_thread():
        assert main(["knn", "--out", str(tmp_path / "single"), *data]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "evaluation",
         "knn", "--out", str(tmp_path / "multi"), *data],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "single" / "results_knn.json").read_text())
    multi = json.loads((tmp_path / "multi" / "results_knn.json").read_text())
    assert multi["meta"]["world_size"] == 2 and single["meta"]["world_size"] == 1
    assert (multi["meta"]["n_train"], multi["meta"]["n_val"]) == (30, 11)
    assert multi["metrics"] == single["metrics"]
    assert proc.stdout.count("## k-NN") == 1  # only rank 0 reports
