"""A quick k-NN on a small labelled set every N training steps, logged like any other training metric.

    monitor = KnnMonitor(cfg.knn_monitor)                  # datasets are opened here: bad paths fail at start-up
    metrics = monitor.maybe_run(teacher_backbone, step)    # None, or {"knn/top1_k20": ..., "knn/top5_k20": ...}

With an initialised process group and `distributed` on, `maybe_run` is a collective: call it on every rank at
the same step; each rank then gets the same numbers. With `distributed` off it runs on the calling process only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransformConfig, make_eval_transform
from evaluation.features import extract_features
from evaluation.knn import fit_ks, knn_evaluate

logger = logging.getLogger(__name__)


@dataclass
class KnnMonitorConfig:
    train: str = ""  # labelled dataset spec (ImageFolder dir, file list, WebDataset); "" turns the monitor off
    val: str = ""
    every_n_steps: int = 0  # 0 turns the monitor off
    max_train: int = 5000  # a fixed random subset (seeded) keeps each run quick; 0 = all
    max_val: int = 1000
    image_size: int = 224  # center crop; the short side is first resized to image_size * 256 / 224
    k: list[int] = field(default_factory=lambda: [10, 20])
    temperature: float = 0.07
    batch_size: int = 128
    num_workers: int = 4
    autocast_dtype: str = "bfloat16"  # CUDA only
    distributed: bool = True  # share the extraction over the ranks (collective); False: this process alone
    seed: int = 0


class KnnMonitor:
    """Runs `knn_evaluate` on the configured sets with whatever backbone it is handed."""

    def __init__(self, cfg: KnnMonitorConfig) -> None:
        self.cfg = cfg
        self.enabled = bool(cfg.every_n_steps > 0 and cfg.train and cfg.val)
        if cfg.every_n_steps > 0 and not (cfg.train and cfg.val):
            raise ValueError("knn monitor: every_n_steps > 0 needs both `train` and `val` labelled datasets")
        if cfg.every_n_steps < 0:
            raise ValueError(f"knn monitor: every_n_steps must be >= 0, got {cfg.every_n_steps}")
        if not self.enabled:
            return
        from torch.utils.data import Subset

        from dinoforge.data.datasets import build_dataset

        transform = make_eval_transform(EvalTransformConfig(
            resize_size=round(cfg.image_size * 256 / 224), crop_size=cfg.image_size, interpolation="bicubic",
            mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
        self.datasets = {}
        for split, spec, limit in (("train", cfg.train, cfg.max_train), ("val", cfg.val, cfg.max_val)):
            dataset = build_dataset(spec, transform=transform, with_labels=True)
            if limit and len(dataset) > limit:
                generator = torch.Generator().manual_seed(cfg.seed)
                indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
                dataset = Subset(dataset, indices)
            self.datasets[split] = dataset
        self.ks, left_out = fit_ks(cfg.k, len(self.datasets["train"]))
        for k, reason in left_out.items():
            logger.warning("knn monitor: k=%d left out (%s)", k, reason)
        logger.info("knn monitor: %d train / %d val images every %d steps, k=%s", len(self.datasets["train"]),
                    len(self.datasets["val"]), cfg.every_n_steps, self.ks)

    def should_run(self, step: int) -> bool:
        return self.enabled and step % self.cfg.every_n_steps == 0

    def maybe_run(self, model: nn.Module, step: int) -> dict[str, float] | None:
        """{"knn/top1_k20": ..., ...} at every `every_n_steps`-th step, else None."""
        if not self.should_run(step):
            return None
        return self.run(model)

    def run(self, model: nn.Module) -> dict[str, float]:
        """k-NN accuracies of `model` (an unwrapped backbone), which is put in eval mode and then back."""
        started = time.time()
        was_training = model.training
        device = next(model.parameters()).device
        model.eval()
        try:
            features = {
                split: extract_features(model, ds, n_last_blocks=1, batch_size=self.cfg.batch_size,
                                        num_workers=self.cfg.num_workers, device=device,
                                        autocast_dtype=self.cfg.autocast_dtype, distributed=self.cfg.distributed,
                                        desc=f"knn monitor {split}")
                for split, ds in self.datasets.items()
            }
        finally:
            model.train(was_training)
        train, val = features["train"], features["val"]
        metrics = knn_evaluate(train.cls, train.labels, val.cls, val.labels, ks=self.ks,
                               temperature=self.cfg.temperature, device=device)
        out = {f"knn/{name}": value for name, value in metrics.items()}
        out["knn/seconds"] = time.time() - started
        return out
