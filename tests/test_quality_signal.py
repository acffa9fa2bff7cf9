"""Issue 3 point 10, issue 12 point 4: `cpu_tiny`, pretrained on Imagenette for a shorter schedule of the shipped
recipe (bench/bench_cpu_recipe.py runs the whole of it), beats the same architecture at random init on k-NN of the
whole val split, and its teacher neither collapses nor stays uniform.

Both backbones are evaluated the same way: [CLS] at the training resolution (48 px centre crop), k=20 weighted k-NN
with all 9,469 train photos as the bank and all 3,925 val photos as queries (binomial standard error ~0.7 points at
30%). Raw pixels are measured and printed beside them: the whole recipe (1,650 steps) beats them, 150 steps do not.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from curate_photos import dataset_root

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the bench scripts are not installed

from bench.bench_cpu_recipe import run  # noqa: E402
from pretrain.metrics import read_metrics  # noqa: E402

STEPS = 150  # of the recipe's 1,650, its warm-ups at the same fractions
MARGIN = 1.5  # k-NN top-1 points over random init (29.5%); the whole recipe: 44.0%


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_cpu_tiny_learns_on_imagenette(tmp_path):
    result = run(dataset_root("imagenette"), tmp_path, STEPS)
    print(json.dumps(result))
    knn = result["knn_k20"]
    assert knn["trained"] >= knn["random_init"] + MARGIN, knn

    records = [r for r in read_metrics(Path(result["run_dir"])) if "dino_loss" in r]
    first, last = records[0], records[-1]
    assert last["dino_loss"] < first["dino_loss"] and last["ibot_loss"] < first["ibot_loss"]
    # No collapse: the teacher's targets are sharper than uniform (log K) but spread over many prototypes, and
    # the batch as a whole still uses all of them.
    saved = yaml.safe_load((Path(result["run_dir"]) / "config.yaml").read_text())
    log_k = math.log(saved["loss"]["dino_head"]["out_dim"])
    assert 0.25 * log_k < last["teacher_entropy"] < 0.9 * log_k
    assert last["teacher_mean_entropy"] > 0.9 * log_k
