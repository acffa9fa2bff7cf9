"""A run's length from its data: `epochs` passes over the dataset, with the recipe's schedule stretched to fit.

A recipe states its schedule in steps for its own `total_steps`; a run of another length keeps that schedule's shape:
the lr warm-up, the heads' last-layer freeze and the teacher-temperature warm-up stay at the same fractions of the run
(`scale_schedule`, shared with `pretrain.recipe_shrink`). Teacher momentum is left alone here: a longer run only
lengthens a horizon that already fits, and a run far shorter than its recipe is what `recipe_shrink` is for.
"""

from __future__ import annotations

import copy
import logging
import math

from dinoforge.data.dataset_spec import split_kind_prefix
from dinoforge.data.datasets import build_source
from dinoforge.data.errors import DatasetError
from dinoforge.data.shard_index import index_path, read_index
from pretrain.optim import OptimConfig
from pretrain.train_config import RunConfig

logger = logging.getLogger(__name__)


def scale_schedule(optim: OptimConfig, fraction: float) -> OptimConfig:
    """A copy of `optim` whose step counts are `fraction` of its own: the same schedule shape for a run that long."""
    out = copy.deepcopy(optim)
    out.warmup_steps = round(optim.warmup_steps * fraction)
    out.freeze_last_layer_steps = round(optim.freeze_last_layer_steps * fraction)
    out.warmup_teacher_temp_steps = round(optim.warmup_teacher_temp_steps * fraction)
    return out


def dataset_size(spec: str, streaming: bool) -> int:
    """Number of images of `spec`: a curated shard set's index when it has one, else the indexed source."""
    _, path = split_kind_prefix(spec)
    if index_path(path).is_file():
        return read_index(path).total_samples
    if streaming:
        raise DatasetError(f"{spec}: `epochs` needs the dataset's size, and these streamed shards have no index "
                           f"(a curate run writes one): set total_steps instead of epochs")
    return len(build_source(spec, labels_required=False))


def resolve_epochs(cfg: RunConfig, world_size: int) -> RunConfig:
    """`cfg` with `epochs` (capped at `max_epoch_images` images) turned into `total_steps`, its schedule stretched
    alike, and `epochs` set to 0; unchanged when `epochs` is 0. The returned config is what the run saves and resumes
    with."""
    if cfg.epochs <= 0:
        return cfg
    images = dataset_size(cfg.data.dataset, cfg.data.streaming)
    if images == 0:
        raise DatasetError(f"data.dataset={cfg.data.dataset}: no images, so `epochs` gives a run of no steps")
    global_batch = cfg.data.batch_size_per_rank * world_size * cfg.optim.accumulation_steps
    seen = cfg.epochs * images
    if cfg.max_epoch_images > 0 and seen > cfg.max_epoch_images:
        logger.info("epochs=%g over %d images would be %d images: capped at max_epoch_images=%d (%.3g epochs)",
                    cfg.epochs, images, round(seen), cfg.max_epoch_images, cfg.max_epoch_images / images)
        seen = cfg.max_epoch_images
    steps = max(1, math.ceil(seen / global_batch))
    out = copy.deepcopy(cfg)
    out.optim = scale_schedule(cfg.optim, steps / cfg.total_steps)
    out.total_steps, out.epochs = steps, 0.0
    logger.info("epochs=%g over %d images at a global batch of %d: total_steps=%d (warm-up %d, last-layer freeze %d,"
                " teacher-temperature warm-up %d steps)", cfg.epochs, images, global_batch, steps,
                out.optim.warmup_steps, out.optim.freeze_last_layer_steps, out.optim.warmup_teacher_temp_steps)
    return out
