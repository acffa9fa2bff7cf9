"""bench/bench_recipe_replicas.py: its k-NN subsets are fixed and stratified, and a recipe's replica runs end to end
and reports its signal (3 steps here; the bench runs 150 on Imagenette)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the bench scripts are not installed

from bench.bench_recipe_replicas import replica, subset_list  # noqa: E402


@pytest.fixture
def data(image_folder, tmp_path) -> Path:
    """A dataset root with the image_folder fixture as its train split."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "train").symlink_to(image_folder)
    return root


def test_subsets_take_the_same_images_per_class_every_time(data, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = subset_list(data, "train", 5, tmp_path / "a").read_text()
    assert a == subset_list(data, "train", 5, tmp_path / "b").read_text()
    lines = a.splitlines()
    assert len(lines) == 15 and sorted({int(line.rsplit(" ", 1)[1]) for line in lines}) == [0, 1, 2]
    assert all(Path(line.rsplit(" ", 1)[0]).is_file() for line in lines)


def test_one_replica_runs_and_reports_its_signal(data, tmp_path, one_thread):
    bank = str(subset_list(data, "train", 10, tmp_path))
    result = replica("vits14", data, tmp_path, steps=3, bank=bank, queries=bank, changes=["model.drop_path_rate=0.2"])
    assert result["prototypes"] == 2048  # 65536 x 32 / 1024: 32 prototypes per teacher row, as in the recipe
    assert result["momentum_teacher"] == 0.9 and result["drop_path_rate"] == 0.2
    assert 0 < result["entropy_first"] <= 1 and 0 < result["dino_loss_last"] < 1.5
    assert 0 <= result["knn_random_init"] <= 100 and 0 <= result["knn_trained"] <= 100
