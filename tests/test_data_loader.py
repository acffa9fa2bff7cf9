"""build_pretrain_loader: bit-identical batches for 1 vs 2 processes and any worker count, exact resume,
decode errors reported per batch, the DataConfig schema, and the streaming path."""

from __future__ import annotations

import dataclasses
import os
import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch
from test_data_fixtures import broken_images, image_files, imagefolder_samples, imagenette_subset, write_shards

from dinoforge.config import ConfigError, load_config
from pretrain.data.loader import DataConfig, build_pretrain_loader, build_pretrain_loader_from_config
from pretrain.data.multicrop import MultiCropConfig

CROPS = MultiCropConfig(global_crops_size=32, local_crops_size=16, local_crops_number=2)
PATCH = 8  # 4x4 token grid
GLOBAL_BATCH = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder() -> Path:
    return imagenette_subset(per_class=4)


def batches(spec, world: int, rank: int, steps: int, start_step: int = 0, num_workers: int = 0) -> list[dict]:
    loader, sampler = build_pretrain_loader(
        str(spec), CROPS, GLOBAL_BATCH // world, rank=rank, world=world, seed=11, start_step=start_step,
        num_workers=num_workers, patch_size=PATCH,
    )
    assert sampler is not None and sampler.start_step == start_step
    return list(islice(iter(loader), steps))


def merge_ranks(parts: list[dict]) -> dict:
    """Rebuild one process's batch from the ranks' batches (crop-major tensors interleave per crop)."""

    def crop_major(key: str, n_crops: int) -> torch.Tensor:
        chunks = [p[key].chunk(n_crops) for p in parts]
        return torch.cat([chunks[r][c] for c in range(n_crops) for r in range(len(parts))])

    return {
        "global_crops": crop_major("global_crops", 2),
        "local_crops": crop_major("local_crops", CROPS.local_crops_number),
        "masks": crop_major("masks", 2),
        "labels": torch.cat([p["labels"] for p in parts]),
        "positions": torch.cat([p["positions"] for p in parts]),
        "upperbound": sum(p["upperbound"] for p in parts),
    }


def test_two_processes_match_one_process_bit_for_bit(folder: Path) -> None:
    single = batches(folder, world=1, rank=0, steps=3)
    ranks = [batches(folder, world=2, rank=0, steps=3, num_workers=2), batches(folder, world=2, rank=1, steps=3)]
    for step, whole in enumerate(single):
        assert whole["step"] == step and whole["positions"].tolist() == list(range(8 * step, 8 * step + 8))
        assert whole["global_crops"].shape == (16, 3, 32, 32) and whole["local_crops"].shape == (16, 3, 16, 16)
        assert whole["masks"].shape == (16, 16) and whole["n_decode_errors"] == 0
        merged = merge_ranks([ranks[0][step], ranks[1][step]])
        for key in ("global_crops", "local_crops", "masks", "labels", "positions"):
            assert torch.equal(merged[key], whole[key]), key
        assert merged["upperbound"] == whole["upperbound"]
        flat = whole["masks"].flatten().nonzero().flatten()
        assert torch.equal(whole["mask_indices"], flat)
    assert not torch.equal(single[0]["global_crops"], single[1]["global_crops"])


def test_resume_continues_the_exact_data_order(folder: Path) -> None:
    full = batches(folder, world=1, rank=0, steps=6)  # 48 samples: crosses the 40-image epoch boundary
    resumed = batches(folder, world=2, rank=1, steps=2, start_step=4, num_workers=1)
    for got, expected in zip(resumed, full[4:], strict=True):
        assert got["step"] == expected["step"]
        assert torch.equal(got["global_crops"][:4], expected["global_crops"][4:8])  # rank 1: second half, crop 1
        assert torch.equal(got["masks"][4:], expected["masks"][12:])  # crop 2 masks of the second half
    epoch_one = torch.cat([b["labels"] for b in full[:5]])  # positions 0..39 = first epoch
    classes = sorted(p.name for p in folder.iterdir())
    expected_labels = sorted(classes.index(p.parent.name) for p in image_files(folder))
    assert sorted(epoch_one.tolist()) == expected_labels


def test_decode_errors_are_substituted_and_reported_per_batch(folder: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(folder, tree)
    victims = image_files(tree)[::7]  # 6 of 40 files broken in place
    for victim, data in zip(victims, (list(broken_images().values()) * 2)[: len(victims)], strict=True):
        victim.write_bytes(data)
    loader, _ = build_pretrain_loader(
        str(tree), CROPS, 8, rank=0, world=1, seed=0, start_step=0, num_workers=2, patch_size=PATCH
    )
    out = list(islice(iter(loader), 5))  # one epoch
    assert all(b["global_crops"].shape == (16, 3, 32, 32) for b in out)
    # One epoch visits each index once; victims are not adjacent, so each is met exactly once.
    assert sum(b["n_decode_errors"] for b in out) == len(victims)
    # Counted inside the worker processes (the main process decoded nothing); prefetching may have met more.
    assert loader.dataset.decode_errors >= len(victims)


def test_niced_workers_run_at_lower_priority_and_load_the_same_batches(folder: Path) -> None:
    plain = batches(folder, world=1, rank=0, steps=2, num_workers=2)
    loader, _ = build_pretrain_loader(str(folder), CROPS, GLOBAL_BATCH, rank=0, world=1, seed=11, start_step=0,
                                      num_workers=2, patch_size=PATCH, worker_nice=5)
    workers = iter(loader)
    niced = [next(workers) for _ in range(2)]
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert [os.getpriority(os.PRIO_PROCESS, w.pid) for w in workers._workers] == [min(ours + 5, 19)] * 2
    for a, b in zip(plain, niced, strict=True):
        assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["masks"], b["masks"])
    with pytest.raises(ValueError, match="worker_nice must be in 0-19"):
        DataConfig(dataset=str(folder), worker_nice=20)


def test_data_config_schema(tmp_path: Path, folder: Path) -> None:
    path = tmp_path / "data.yaml"
    path.write_text(
        f"dataset: {folder}\nbatch_size_per_rank: 4\nnum_workers: 0\n"
        "multicrop:\n  global_crops_size: 32\n  local_crops_size: 16\n  local_crops_number: 2\n"
    )
    cfg = load_config(DataConfig, path, ["multicrop.blur_semantics=dinov2_legacy", "mask_probability=1.0"])
    assert cfg.multicrop.blur_semantics == "dinov2_legacy" and tuple(cfg.mask_ratio_min_max) == (0.1, 0.5)
    loader, sampler = build_pretrain_loader_from_config(cfg, rank=0, world=1, seed=0, start_step=0, patch_size=PATCH)
    batch = next(iter(loader))
    assert batch["global_crops"].shape == (8, 3, 32, 32)
    assert bool((batch["masks"].sum(1) > 0).all())  # mask_probability=1: every global crop masked
    with pytest.raises(ConfigError, match="did you mean 'mask_probability'"):
        load_config(DataConfig, path, ["mask_probabilty=0.3"])
    with pytest.raises(ConfigError, match="dataset"):
        load_config(DataConfig)  # the dataset has no default


@pytest.mark.parametrize("photometric", ["per_image", "batched"])
def test_streaming_path(folder: Path, tmp_path: Path, photometric: str) -> None:
    from pretrain.data.multicrop import apply_batch_photometric

    write_shards(tmp_path, imagefolder_samples(folder), per_shard=10)
    crops = dataclasses.replace(CROPS, photometric=photometric)
    loader, sampler = build_pretrain_loader(
        str(tmp_path), crops, 4, rank=0, world=2, seed=0, start_step=0, num_workers=0, patch_size=PATCH,
        streaming=True, shuffle_buffer=8,
    )
    assert sampler is None
    raw = list(islice(iter(loader), 2))
    assert (raw[0]["global_crops"].dtype == torch.uint8) == (photometric == "batched")
    assert ("global_photometric" in raw[0]) == (photometric == "batched")
    first, second = [apply_batch_photometric(batch, crops) for batch in raw]
    assert first["global_crops"].shape == (8, 3, 32, 32) and first["local_crops"].shape == (8, 3, 16, 16)
    assert first["global_crops"].dtype == torch.float32 and "global_photometric" not in first
    assert first["labels"].shape == (4,) and int((first["masks"].sum(1) > 0).sum()) == 4
    assert not torch.equal(first["global_crops"], second["global_crops"])


def test_batched_photometric_loads_uint8_crops_with_their_parameters_alike_for_any_worker_count(folder: Path) -> None:
    """photometric="batched": the loader carries uint8 crops and one parameter row per crop, bit-identical with and
    without workers; the trainer's `apply_batch_photometric` finishes them into normalised float crops."""
    from pretrain.data.multicrop import apply_batch_photometric
    from pretrain.data.photometric import N_PARAMS

    crops = MultiCropConfig(global_crops_size=32, local_crops_size=16, local_crops_number=2, photometric="batched")

    def load(num_workers: int) -> list[dict]:
        loader, _ = build_pretrain_loader(str(folder), crops, GLOBAL_BATCH, rank=0, world=1, seed=11, start_step=0,
                                          num_workers=num_workers, patch_size=PATCH)
        return list(islice(iter(loader), 2))

    inline, workers = load(0), load(2)
    for a, b in zip(inline, workers, strict=True):
        assert a["global_crops"].dtype == torch.uint8 and a["global_crops"].shape == (2 * GLOBAL_BATCH, 3, 32, 32)
        assert a["global_photometric"].shape == (2 * GLOBAL_BATCH, N_PARAMS)
        assert a["local_photometric"].shape == (2 * GLOBAL_BATCH, N_PARAMS)
        for key in ("global_crops", "local_crops", "global_photometric", "local_photometric", "masks"):
            assert torch.equal(a[key], b[key]), key
    finished = apply_batch_photometric(inline[0], crops)
    assert finished["global_crops"].dtype == torch.float32 and finished["local_crops"].shape == (16, 3, 16, 16)
    assert finished["global_crops"].std() > 0.3
