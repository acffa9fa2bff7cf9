"""`epochs` as the unit of a run: steps from the dataset's size, the recipe's schedule stretched to the same shape."""

from __future__ import annotations

import math

import pytest
import yaml
from test_train import finish, run_cli, tiny_overrides

from dinoforge.config import load_config
from dinoforge.data.errors import DatasetError
from dinoforge.data.shard_index import ShardEntry, write_index
from pretrain.metrics import read_metrics
from pretrain.run_length import dataset_size, resolve_epochs, scale_schedule
from pretrain.train_config import TrainConfig

IMAGES = 48  # the image_folder fixture


def config(data, **overrides) -> TrainConfig:
    values = {"data.dataset": str(data), "total_steps": 1000, "optim.warmup_steps": 100,
              "optim.freeze_last_layer_steps": 10, "optim.warmup_teacher_temp_steps": 300, **overrides}
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in values.items()])


def test_scale_schedule_keeps_every_warm_up_at_its_fraction_of_the_run(image_folder):
    optim = config(image_folder).optim
    half = scale_schedule(optim, 0.5)
    assert (half.warmup_steps, half.freeze_last_layer_steps, half.warmup_teacher_temp_steps) == (50, 5, 150)
    assert half.momentum_teacher == optim.momentum_teacher and half.base_lr == optim.base_lr
    assert optim.warmup_steps == 100  # the input is left as it was


@pytest.mark.parametrize(("epochs", "batch", "world"), [(10, 8, 1), (2.5, 8, 2), (1, 100, 1)])
def test_epochs_give_total_steps_from_the_dataset_size(image_folder, epochs, batch, world):
    cfg = config(image_folder, epochs=epochs, **{"data.batch_size_per_rank": batch})
    out = resolve_epochs(cfg, world)
    steps = math.ceil(epochs * IMAGES / (batch * world))
    assert out.total_steps == steps and out.epochs == 0
    fraction = steps / 1000
    assert out.optim.warmup_steps == round(100 * fraction)
    assert out.optim.warmup_teacher_temp_steps == round(300 * fraction)
    assert cfg.total_steps == 1000 and cfg.epochs == epochs  # the input is left as it was


def test_max_epoch_images_caps_the_run_of_a_big_folder(image_folder):
    cfg = config(image_folder, epochs=10, max_epoch_images=100, **{"data.batch_size_per_rank": 8})
    out = resolve_epochs(cfg, 1)
    assert out.total_steps == math.ceil(100 / 8)  # 10 epochs of 48 images would be 480
    assert out.optim.warmup_steps == round(100 * out.total_steps / 1000)
    uncapped = resolve_epochs(config(image_folder, epochs=1, max_epoch_images=100), 1)
    assert uncapped.total_steps == math.ceil(48 / 64)


def test_no_epochs_leaves_the_config_as_it_is(image_folder):
    cfg = config(image_folder)
    assert resolve_epochs(cfg, 4) is cfg


def test_curated_shards_are_counted_from_their_index(tmp_path):
    entries = [ShardEntry(f"s{i}.tar", count, 1, "0" * 64, 0, "a", "b") for i, count in enumerate((7, 5))]
    write_index(tmp_path, entries)
    assert dataset_size(str(tmp_path), streaming=True) == 12


def test_streamed_shards_without_an_index_ask_for_total_steps(tmp_path):
    (tmp_path / "data-000000.tar").write_bytes(b"")
    with pytest.raises(DatasetError, match="set total_steps instead of epochs"):
        dataset_size(str(tmp_path / "data-{000000..000000}.tar"), streaming=True)


def test_own_flat_folder_trained_in_epochs_saves_and_trains_the_resolved_length(image_folder, tmp_path):
    """A user's folder of photos, no class subfolders: 48 images at 8 per step, 1.5 epochs are 9 steps, and a
    warm-up of 2 of the 6 stated steps becomes 3."""
    photos = tmp_path / "my_photos"
    photos.mkdir()
    for image in sorted(image_folder.rglob("*.jpg")):
        (photos / f"{image.parent.name}_{image.name}").write_bytes(image.read_bytes())
    (photos / "notes.txt").write_text("not a photo\n")
    assert dataset_size(str(photos), streaming=False) == IMAGES
    finish(run_cli(tiny_overrides(photos, tmp_path, "epochs", steps=6, epochs=1.5, checkpoint_every=0)))
    saved = yaml.safe_load((tmp_path / "epochs" / "config.yaml").read_text())
    assert saved["total_steps"] == 9 and saved["epochs"] == 0 and saved["optim"]["warmup_steps"] == 3
    assert max(r["step"] for r in read_metrics(tmp_path / "epochs") if "dino_loss" in r) == 8
    assert (tmp_path / "epochs" / "export").is_dir()
