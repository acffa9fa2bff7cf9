"""bench/bench_augment.py: it times both photometric paths of a recipe on the same photos and reports the worker's
saving (the figure behind the recipes' `photometric: batched`)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the bench scripts are not installed

from bench.bench_augment import load_images, measure  # noqa: E402


def test_the_batched_worker_does_less_than_the_per_image_one(image_folder, one_thread):
    images = load_images(image_folder, 12)
    assert len(images) == 12 and len({image.size for image in images}) == 1
    result = measure("gpu_small", images, trainer_threads=1)
    assert result["crops"] == "2 x 112 + 8 x 48 px" and result["shipped"] == "batched"
    ms = result["worker_ms_per_image"]
    assert ms["batched"] > 0 and abs(result["worker_ratio"] - ms["per_image"] / ms["batched"]) < 0.05
    assert result["worker_ratio"] > 1.5  # ~3x measured on Imagenette photos
    assert result["trainer_cpu_ms_per_image_batched"] > 0
