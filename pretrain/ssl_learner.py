"""Pretraining as the trainer sees it: one learner, the student of `SSLMetaArch`, whose EMA is its teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from dinoforge.launch import DistributedEnv
from dinoforge.models.config import build_backbone
from dinoforge.models.flops import train_step_flops
from pretrain.distributed import ema_update, parallelize
from pretrain.export import export_teacher
from pretrain.initial_weights import load_initial_weights
from pretrain.learner import Learner, RunModels
from pretrain.meta_arch import SSLMetaArch
from pretrain.schedules import ScheduleValues
from pretrain.train_config import TrainConfig


def build_meta_arch(cfg: TrainConfig, env: DistributedEnv) -> SSLMetaArch:
    # Same seed on every rank: FSDP2 keeps each rank's shard of its own initialisation, so they must agree.
    torch.manual_seed(cfg.seed)
    meta = SSLMetaArch(cfg.model, cfg.loss)
    if cfg.init_weights:
        load_initial_weights(meta, cfg.init_weights)
    meta.to(env.device)
    for side in (meta.student, meta.teacher):
        parallelize(side, env, cfg.precision, cfg.activation_checkpointing and side is meta.student, cfg.compile)
    return meta


def flops_per_step(meta: SSLMetaArch, batch: dict) -> float:
    """FLOPs of one training step on this process: student forward + backward (3x forward), teacher forward.

    Counted on a meta-device copy of the backbone (the live one may be sharded); heads are linear layers, so
    their forward costs 2 FLOPs per weight per row.
    """
    with torch.device("meta"):
        backbone = build_backbone(meta.model_cfg, drop_path=False)
    crops = [tuple(batch["global_crops"].shape), tuple(batch["local_crops"].shape)]
    backbones = train_step_flops(backbone, crops, teacher=backbone, teacher_crops=crops[:1])
    head_weights = sum(p.numel() for name, p in meta.student.named_parameters() if "head" in name)
    rows = batch["global_crops"].shape[0] + batch["local_crops"].shape[0] + int(batch["n_masked_patches"])
    teacher_rows = batch["global_crops"].shape[0] + int(batch["n_masked_patches"])
    return backbones + 2 * head_weights * (3 * rows + teacher_rows)


class SSLLearner(Learner):
    """The student of a pretraining run; its teacher follows it by EMA after every optimizer step."""

    def __init__(self, meta: SSLMetaArch, cfg: TrainConfig) -> None:
        self.meta = meta
        self.name = ""
        self.folder = cfg.run_dir
        self.model_cfg, self.optim = cfg.model, cfg.optim
        self.prototypes = cfg.loss.dino_head.out_dim

    def trainable(self) -> nn.Module:
        return self.meta.student

    def loss(self, batch: dict, shared: None, values: ScheduleValues) -> tuple[Tensor, dict[str, Tensor]]:
        return self.meta.compute_losses(batch, values.teacher_temp)

    def after_optimizer_step(self, values: ScheduleValues) -> None:
        ema_update(self.meta.teacher, self.meta.student, values.momentum)

    def state_module(self) -> nn.Module:
        return self.meta

    def monitored_backbone(self) -> nn.Module:
        return self.meta.teacher["backbone"]

    def flops_per_step(self, batch: dict) -> float:
        return flops_per_step(self.meta, batch)

    def export(self, env: DistributedEnv) -> Path:
        return export_teacher(self.meta, self.folder / "export", env)


def build_pretraining(cfg: TrainConfig, env: DistributedEnv) -> RunModels:
    """The models of a pretraining run, on the run's device and sharded."""
    meta = build_meta_arch(cfg, env)
    return RunModels(module=meta, learners=[SSLLearner(meta, cfg)])
