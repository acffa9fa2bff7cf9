"""Linear probe: a grid of linear heads on frozen features, trained together, chosen on a train holdout.

The grid is DINOv2's (learning rates x CLS of the last 1 or 4 blocks x with/without the average-pooled patch
tokens of the last block). All heads read the same precomputed feature batch, so the backbone runs once per
sample, not once per head. The head is chosen by accuracy on a stratified holdout of the train split (DINOv2
chose on the reported val split, which flatters the number); with `refit` the chosen head is then retrained on
the whole train split. Training uses SGD with momentum and a cosine schedule to zero, per iteration.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from evaluation.config import LinearConfig
from evaluation.feature_set import FeatureSet
from evaluation.holdout import stratified_holdout
from evaluation.metrics import topk_accuracy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadSpec:
    """One point of the grid."""

    lr: float  # base learning rate, before the batch-size scaling
    n_blocks: int
    avgpool: bool

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}_blocks{self.n_blocks}_{'avgpool' if self.avgpool else 'cls'}"

    def in_features(self, dim: int) -> int:
        return dim * (self.n_blocks + int(self.avgpool))


def head_grid(cfg: LinearConfig) -> list[HeadSpec]:
    if not cfg.learning_rates or not cfg.n_last_blocks or not cfg.avgpool:
        raise ValueError("linear.learning_rates, linear.n_last_blocks and linear.avgpool must each list >= 1 value")
    return [HeadSpec(lr, n, pool) for n, pool, lr in itertools.product(cfg.n_last_blocks, cfg.avgpool,
                                                                        cfg.learning_rates)]


def linear_input(features: FeatureSet | tuple[Tensor, Tensor], spec: HeadSpec) -> Tensor:
    """The head's input: concatenated CLS tokens of the last `n_blocks` blocks (+ the mean patch token)."""
    block_cls, patch_mean = (features.block_cls, features.patch_mean) if isinstance(features, FeatureSet) \
        else features
    x = block_cls[:, -spec.n_blocks :].flatten(1)
    return torch.cat([x, patch_mean], dim=1) if spec.avgpool else x


def train_heads(specs: list[HeadSpec], train: FeatureSet, num_classes: int, cfg: LinearConfig, seed: int,
                device: torch.device) -> list[nn.Linear]:
    """Train one linear head per spec, all on the same shuffled batches, each with its own learning rate."""
    too_deep = [s.n_blocks for s in specs if s.n_blocks > train.n_blocks]
    if too_deep:
        raise ValueError(f"heads use the last {max(too_deep)} blocks but features hold {train.n_blocks}")
    # Separate streams: the batch order must not depend on how many heads drew their init before it.
    init_generator = torch.Generator().manual_seed(seed)
    order_generator = torch.Generator().manual_seed(seed + 1)
    heads = []
    for spec in specs:
        head = nn.Linear(spec.in_features(train.dim), num_classes)
        # DINOv2's head init; drawn from our generator so that the result depends on `seed` only.
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=init_generator) * 0.01)
            head.bias.zero_()
        heads.append(head.to(device))
    scale = cfg.batch_size / 256  # DINOv2's linear scaling rule for the base learning rates
    optimizer = torch.optim.SGD(
        [{"params": h.parameters(), "lr": s.lr * scale} for h, s in zip(heads, specs, strict=True)],
        momentum=cfg.momentum, weight_decay=cfg.weight_decay,
    )
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(cfg.epochs * steps_per_epoch, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    block_cls, patch_mean = train.block_cls.to(device), train.patch_mean.to(device)
    labels = train.labels.to(device)
    for _ in tqdm(range(cfg.epochs), desc=f"linear heads x{len(heads)}", leave=False):
        order = torch.randperm(n, generator=order_generator).to(device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = (block_cls[idx].float(), patch_mean[idx].float())
            inputs = _inputs_by_view(specs, batch)
            loss = sum(F.cross_entropy(h(inputs[(s.n_blocks, s.avgpool)]), labels[idx])
                       for h, s in zip(heads, specs, strict=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return heads


@torch.no_grad()
def evaluate_heads(specs: list[HeadSpec], heads: list[nn.Linear], data: FeatureSet, device: torch.device,
                   batch_size: int = 4096) -> list[dict[str, float]]:
    """Per head: top-1 / top-5 accuracy (%) and mean cross-entropy on `data`."""
    logits: list[list[Tensor]] = [[] for _ in heads]
    for start in range(0, len(data), batch_size):
        batch = (data.block_cls[start : start + batch_size].to(device).float(),
                 data.patch_mean[start : start + batch_size].to(device).float())
        inputs = _inputs_by_view(specs, batch)
        for out, head, spec in zip(logits, heads, specs, strict=True):
            out.append(head(inputs[(spec.n_blocks, spec.avgpool)]).float().cpu())
    results = []
    for out in logits:
        scores = torch.cat(out)
        acc = topk_accuracy(scores, data.labels)
        results.append({"top1": acc[1], "top5": acc[5], "loss": F.cross_entropy(scores, data.labels).item()})
    return results


def linear_probe(train: FeatureSet, val: FeatureSet, num_classes: int, cfg: LinearConfig, seed: int = 0,
                 device: torch.device | str = "cpu") -> dict:
    """Train the grid on the train split minus a holdout, pick the best head on the holdout, report it on val.

    Returns {"metrics": {top1, top5}, "chosen": {name, lr, n_blocks, avgpool, holdout_top1}, "grid": rows}.
    """
    device = torch.device(device)
    specs = head_grid(cfg)
    fit_idx, holdout_idx = stratified_holdout(train.labels, cfg.holdout_fraction, seed)
    fit, holdout = train.subset(fit_idx), train.subset(holdout_idx)
    logger.info("linear probe: %d heads, %d fit / %d holdout / %d val samples", len(specs), len(fit), len(holdout),
                len(val))
    heads = train_heads(specs, fit, num_classes, cfg, seed, device)
    holdout_scores = evaluate_heads(specs, heads, holdout, device)
    # Highest holdout top-1; ties (frequent on small holdouts) go to the lower holdout loss.
    best = min(range(len(specs)), key=lambda i: (-holdout_scores[i]["top1"], holdout_scores[i]["loss"]))
    chosen = specs[best]
    if cfg.refit:
        final_head = train_heads([chosen], train, num_classes, cfg, seed, device)[0]
    else:
        final_head = heads[best]
    val_scores = evaluate_heads([chosen], [final_head], val, device)[0]
    grid = [{"head": s.name, "lr": s.lr, "n_blocks": s.n_blocks, "avgpool": s.avgpool,
             "holdout_top1": r["top1"], "holdout_loss": r["loss"], "chosen": i == best}
            for i, (s, r) in enumerate(zip(specs, holdout_scores, strict=True))]
    return {
        "metrics": {"top1": val_scores["top1"], "top5": val_scores["top5"]},
        "chosen": {"head": chosen.name, "lr": chosen.lr, "n_blocks": chosen.n_blocks, "avgpool": chosen.avgpool,
                   "holdout_top1": holdout_scores[best]["top1"], "refit_on_full_train": cfg.refit},
        "grid": grid,
        "split": {"fit": len(fit), "holdout": len(holdout), "val": len(val)},
    }


def _inputs_by_view(specs: list[HeadSpec], batch: tuple[Tensor, Tensor]) -> dict[tuple[int, bool], Tensor]:
    """One input tensor per distinct (n_blocks, avgpool), shared by the heads of every learning rate."""
    views = {(s.n_blocks, s.avgpool) for s in specs}
    return {v: linear_input(batch, HeadSpec(0.0, *v)) for v in views}
