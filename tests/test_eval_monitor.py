"""The in-training k-NN monitor: runs on its schedule, restores the model's mode, reports what knn_evaluate says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_eval_support import imagenette_file_list, one_torch_thread
from torch.utils.data import Subset

from dinoforge.models import vit_tiny
from evaluation.features import extract_features
from evaluation.knn import knn_evaluate
from evaluation.monitor import KnnMonitor, KnnMonitorConfig


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def lists(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("monitor")
    return {"train": imagenette_file_list(tmp / "train.txt", "train", 6),
            "val": imagenette_file_list(tmp / "val.txt", "val", 3)}


def monitor_config(lists: dict[str, Path], **overrides) -> KnnMonitorConfig:
    values = {"train": str(lists["train"]), "val": str(lists["val"]), "every_n_steps": 5, "image_size": 64,
              "k": [5, 20, 100], "batch_size": 16, "num_workers": 0, "max_train": 40, "max_val": 0}
    return KnnMonitorConfig(**{**values, **overrides})


def test_runs_every_n_steps_on_a_fixed_subset_and_restores_train_mode(lists):
    torch.manual_seed(0)
    model = vit_tiny(patch_size=16, img_size=64).train()
    monitor = KnnMonitor(monitor_config(lists))
    assert len(monitor.datasets["train"]) == 40 and len(monitor.datasets["val"]) == 30
    assert monitor.ks == [5, 20]  # k=100 > 40 train images cannot run
    assert monitor.maybe_run(model, 3) is None
    metrics = monitor.maybe_run(model, 10)
    assert model.training
    assert set(metrics) == {"knn/top1_k5", "knn/top5_k5", "knn/top1_k20", "knn/top5_k20", "knn/seconds"}

    model.eval()
    train = extract_features(model, monitor.datasets["train"], batch_size=7)
    val = extract_features(model, monitor.datasets["val"], batch_size=7)
    expected = knn_evaluate(train.cls, train.labels, val.cls, val.labels, ks=[5, 20])
    for name, value in expected.items():
        assert metrics[f"knn/{name}"] == pytest.approx(value)
    again = monitor.maybe_run(model, 15)
    assert not model.training  # an eval-mode model stays in eval mode
    assert {k: v for k, v in again.items() if k != "knn/seconds"} == \
        {k: v for k, v in metrics.items() if k != "knn/seconds"}


def test_subset_is_seeded_and_spread_over_the_dataset(lists):
    a = KnnMonitor(monitor_config(lists, max_train=12, seed=1)).datasets["train"]
    b = KnnMonitor(monitor_config(lists, max_train=12, seed=1)).datasets["train"]
    c = KnnMonitor(monitor_config(lists, max_train=12, seed=2)).datasets["train"]
    assert isinstance(a, Subset) and a.indices == b.indices != c.indices
    assert max(a.indices) > 12  # a random draw, not the first classes only


def test_off_by_default_and_clear_errors_when_half_configured(lists):
    assert KnnMonitor(KnnMonitorConfig()).maybe_run(torch.nn.Linear(1, 1), 0) is None
    with pytest.raises(ValueError, match="needs both `train` and `val`"):
        KnnMonitor(KnnMonitorConfig(every_n_steps=10, train=str(lists["train"])))
    # every k above the bank: the bank's size is the k (evaluation.knn.fit_ks), with a warning, not a failed run
    assert KnnMonitor(monitor_config(lists, k=[50])).ks == [40]
