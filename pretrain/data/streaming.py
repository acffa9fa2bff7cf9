"""Streaming WebDataset shards with the `webdataset` library, for pools too large for random access.

Pipeline of small stages: shard list -> split by node (rank) -> split by DataLoader worker -> tar -> decode ->
transform. `resampled=True` draws shards with replacement forever from a generator seeded by (seed, rank, worker),
so every rank and worker reads its own random shard sequence (no list splitting is needed, and none would be
correct with replacement); `resampled=False` reads each shard once, split disjointly over ranks then workers.
Tars are read by the shared member loop and key grouper of `dinoforge.data` (as by curation and the random-access
scan). A shard that cannot be read, a sample without an image, or an image that does not decode is counted, logged
with its shard and key, and skipped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from dinoforge.collectives import current_rank, current_world_size
from dinoforge.data.dataset_spec import shard_paths
from dinoforge.data.decode import DEFAULT_POLICY, DecodePolicy, ImageDecodeError, decode_image, log_decoder
from dinoforge.data.error_counter import DecodeErrorCounter
from dinoforge.data.formats import image_member, label_member
from dinoforge.data.tar_reader import TarDamage, iter_tar_members
from dinoforge.data.tar_samples import StrayMember, group_samples
from dinoforge.data.tar_shards import parse_label
from dinoforge.launch import is_distributed, launch_place
from pretrain.data.seeding import STREAM_SHARDS, derive_seed

logger = logging.getLogger(__name__)


class WebDatasetStream(wds.DataPipeline):
    """A `webdataset.DataPipeline` that also exposes its error counts (shared with DataLoader workers)."""

    def __init__(self, *stages: Any, decode_errors: DecodeErrorCounter, shard_errors: DecodeErrorCounter) -> None:
        super().__init__(*stages)
        self._decode_errors = decode_errors
        self._shard_errors = shard_errors

    @property
    def decode_errors(self) -> int:
        """Samples skipped because their image or label did not decode."""
        return self._decode_errors.value

    @property
    def shard_errors(self) -> int:
        """Shard read errors (unreadable or corrupt tar); the rest of such a shard is skipped."""
        return self._shard_errors.value


def webdataset_stream(
    urls: str | Path | Sequence[str],
    transform: Callable[[Image.Image], Any] | None = None,
    resampled: bool = True,
    seed: int = 0,
    rank: int | None = None,
    world: int | None = None,
    with_labels: bool = True,
    max_pixels: int | None = None,
    shuffle_buffer: int = 0,
    as_dict: bool = False,
) -> WebDatasetStream:
    """An iterable dataset over WebDataset shards.

    `urls`: a list of shard paths, a brace pattern, a `.tar`, a directory of shards or a `curate` run/shard folder.
    Yields `(image, label)` (label -1 when the sample has none), `image` when `with_labels=False`, or with
    `as_dict=True` a dict with image, label, key, url and n_decode_errors (samples skipped just before this one).
    `rank`/`world` default to torch.distributed's, then to the launcher's (`dinoforge.launch.launch_place`).
    """
    shards = list(urls) if isinstance(urls, (list, tuple)) else shard_paths(str(urls))
    if not shards:
        raise ValueError(f"no shards in {urls!r}")
    rank, world = _rank_and_world(rank, world)
    decode_errors, shard_errors = DecodeErrorCounter(), DecodeErrorCounter()
    if resampled:
        source = [wds.ResampledShards(shards, seed=seed, worker_seed=partial(_worker_seed, rank), deterministic=True)]
    else:
        if len(shards) < world:
            logger.warning("only %d shard(s) for %d ranks: some ranks will read nothing", len(shards), world)
        source = [wds.SimpleShardList(shards), partial(split_by_rank, rank=rank, world=world), wds.split_by_worker]
    stages: list[Any] = [*source, TarSampleStage(shard_errors)]
    if shuffle_buffer > 1:
        stages.append(partial(shuffle_samples, buffer_size=shuffle_buffer, seed=seed, rank=rank))
    policy = DEFAULT_POLICY if max_pixels is None else replace(DEFAULT_POLICY, max_pixels=max_pixels)
    stages.append(DecodeStage(transform, with_labels, policy, decode_errors, as_dict))
    return WebDatasetStream(*stages, decode_errors=decode_errors, shard_errors=shard_errors)


def split_by_rank(src: Iterable[Any], rank: int, world: int) -> Iterator[Any]:
    """Every `world`-th item of `src` starting at `rank` (the node split, with an explicit rank)."""
    yield from islice(src, rank, None, world)


def shuffle_samples(src: Iterable[Any], buffer_size: int, seed: int, rank: int) -> Iterator[Any]:
    """Shuffle a stream through a buffer of `buffer_size` samples, seeded per (seed, rank, worker)."""
    rng = random.Random(derive_seed(seed, STREAM_SHARDS, rank, _worker_id() + 1))
    buffer: list[Any] = []
    for sample in src:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class TarSampleStage:
    """Pipeline stage: shard dicts (`url`) -> webdataset-style sample dicts, by the shared tar member loop and key
    grouper (`dinoforge.data.tar_reader`, `dinoforge.data.tar_samples`).

    A sample without a usable image is passed on with its reason (`__reject__`) for `DecodeStage` to count with the
    samples that do not decode; an unreadable or damaged shard is counted and logged (its samples before the damage
    are read); a member that belongs to no sample is logged.
    """

    def __init__(self, counter: DecodeErrorCounter) -> None:
        self.counter = counter

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in src:
            url = shard["url"]
            for item in group_samples(iter_tar_members(url)):
                if isinstance(item, TarDamage):
                    self.counter.add()
                    logger.warning("skipping unreadable shard data in %s: %s", url, item.reason)
                elif isinstance(item, StrayMember):
                    logger.warning("skipping tar member %s in %s: %s", item.member.name, url, item.reason)
                else:
                    sample: dict[str, Any] = {"__key__": item.key, "__url__": url}
                    sample.update((ext, member.data) for ext, member in item.usable().items())
                    if (reason := item.reject_reason()) is not None:
                        sample["__reject__"] = reason
                    yield sample


class DecodeStage:
    """Pipeline stage: webdataset sample dicts -> decoded (and transformed) outputs, skipping bad samples."""

    def __init__(
        self,
        transform: Callable[[Image.Image], Any] | None,
        with_labels: bool,
        policy: DecodePolicy,
        counter: DecodeErrorCounter,
        as_dict: bool,
    ) -> None:
        self.transform = transform
        self.with_labels = with_labels
        self.policy = policy
        self.counter = counter
        self.as_dict = as_dict
        log_decoder()  # in the process that builds the pipeline, before data workers fork

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[Any]:
        skipped = 0
        for sample in src:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            try:
                image, label = self._decode(sample)
            except ImageDecodeError as err:
                self.counter.add()
                skipped += 1
                logger.warning("skipping unreadable sample %s in %s: %s", key, url, err.reason)
                continue
            if self.transform is not None:
                image = self.transform(image)
            if self.as_dict:
                yield {"image": image, "label": label, "key": key, "url": url, "n_decode_errors": skipped}
            else:
                yield (image, label) if self.with_labels else image
            skipped = 0

    def _decode(self, sample: dict[str, Any]) -> tuple[Image.Image, int]:
        if "__reject__" in sample:
            raise ImageDecodeError(sample["__reject__"])
        members = [k for k in sample if not k.startswith("__")]
        image_ext = image_member(members)
        image = decode_image(sample[image_ext], self.policy)
        label = -1
        label_ext = label_member(members)
        if self.with_labels and label_ext is not None:
            try:
                label = parse_label(sample[label_ext], label_ext)
            except ValueError as err:
                raise ImageDecodeError(f"bad label member .{label_ext}: {err}") from None
        return image, label


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def _worker_seed(rank: int) -> int:
    """Seed of a (rank, worker) shard stream; ResampledShards mixes it with the run seed and its epoch."""
    return derive_seed(rank, _worker_id())


def _rank_and_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """The explicit (rank, world), else the process group's, else the launcher's (torchrun or Slurm variables)."""
    if rank is not None and world is not None:
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        return rank, world
    if is_distributed():
        return current_rank(), current_world_size()
    place = launch_place()
    return place.rank, place.world_size
