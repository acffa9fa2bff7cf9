"""webdataset_stream: node/worker splitting, every sample once without resampling, infinite resampling,
decode and shard errors counted and skipped (also inside DataLoader workers)."""

from __future__ import annotations

import logging
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from test_data_fixtures import broken_images, imagefolder_samples, imagenette_subset, jpeg_bytes, write_shards
from torch.utils.data import DataLoader

from pretrain.data.streaming import webdataset_stream


def small_pixels(image) -> np.ndarray:
    return np.asarray(image.resize((8, 8)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[tuple[str, bytes, int]]]:
    """8 shards x 5 real JPEGs with labels."""
    samples = imagefolder_samples(imagenette_subset(per_class=4))
    folder = tmp_path_factory.mktemp("stream")
    write_shards(folder, samples, per_shard=5)
    return folder, samples


def read_all(stream, num_workers: int) -> list[dict]:
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    return list(loader)


def test_ranks_and_workers_read_disjoint_shards_and_every_sample_once(shards) -> None:
    folder, samples = shards
    seen: dict[int, list[dict]] = {}
    for rank in range(2):
        stream = webdataset_stream(folder, transform=small_pixels, resampled=False, rank=rank, world=2, as_dict=True)
        seen[rank] = read_all(stream, num_workers=2)
    shards_of = {rank: {s["url"] for s in out} for rank, out in seen.items()}
    assert shards_of[0].isdisjoint(shards_of[1]) and len(shards_of[0] | shards_of[1]) == 8
    keys = Counter(s["key"] for out in seen.values() for s in out)
    assert keys == Counter(key for key, _, _ in samples)  # each sample exactly once over 2 ranks x 2 workers
    by_key = {key: label for key, _, label in samples}
    assert all(s["label"] == by_key[s["key"]] for out in seen.values() for s in out)


def test_worker_split_inside_one_rank(shards) -> None:
    folder, samples = shards
    stream = webdataset_stream(folder, transform=small_pixels, resampled=False, rank=1, world=2, as_dict=True)
    # rank 1 owns shards 1, 3, 5, 7; with 2 workers, worker 0 gets 1 and 5, worker 1 gets 3 and 7
    out = read_all(stream, num_workers=2)
    urls = [Path(s["url"]).name for s in out]
    assert sorted(set(urls)) == ["shard-000001.tar", "shard-000003.tar", "shard-000005.tar", "shard-000007.tar"]
    assert len(out) == 20


def test_resampled_is_infinite_reproducible_and_rank_dependent(shards) -> None:
    folder, samples = shards
    valid = {key for key, _, _ in samples}

    def keys(rank: int, seed: int) -> list[str]:
        stream = webdataset_stream(folder, resampled=True, seed=seed, rank=rank, world=2, as_dict=True)
        return [s["key"] for s in islice(iter(stream), 100)]  # 2.5x the dataset

    first = keys(0, seed=1)
    assert len(first) == 100 and set(first) <= valid
    assert keys(0, seed=1) == first
    assert keys(1, seed=1) != first
    assert keys(0, seed=2) != first


def test_tuple_and_image_outputs(shards) -> None:
    folder, samples = shards
    image, label = next(iter(webdataset_stream(folder, resampled=False, rank=0, world=1)))
    assert image.mode == "RGB" and label == samples[0][2]
    only_image = next(iter(webdataset_stream(str(folder / "shard-{000000..000007}.tar"), with_labels=False)))
    assert only_image.mode == "RGB"


def test_decode_and_shard_errors_are_counted_and_skipped(tmp_path: Path, caplog) -> None:
    samples = [(f"good{i}", jpeg_bytes(16, 16, seed=i), i) for i in range(6)]
    bad = [(f"bad_{name}", data, 0) for name, data in broken_images().items()]
    write_shards(tmp_path, samples[:3] + bad[:3], per_shard=6, prefix="a")
    write_shards(tmp_path, bad[3:] + samples[3:], per_shard=6, prefix="b")
    (tmp_path / "c-000000.tar").write_bytes(b"\x00garbage" * 300)  # not a tar: a shard-level error
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    stream = webdataset_stream(urls, transform=small_pixels, resampled=False, rank=0, world=1, as_dict=True)
    with caplog.at_level(logging.WARNING):
        out = list(stream)
    assert [s["key"] for s in out] == [f"good{i}" for i in range(6)]
    assert [s["n_decode_errors"] for s in out] == [0, 0, 0, 5, 0, 0]  # the 5 bad samples sit between good2 and good3
    assert stream.decode_errors == 5 and stream.shard_errors >= 1
    assert "bad_truncated" in caplog.text and "a-000000.tar" in caplog.text and "empty file" in caplog.text

    in_workers = webdataset_stream(urls, transform=small_pixels, resampled=False, rank=0, world=1)
    assert len(read_all(in_workers, num_workers=2)) == 6
    assert in_workers.decode_errors == 5  # counted in the workers, visible here
