"""The trainer's seam: what one optimisation step needs from the models of a run, whatever they learn from.

Pretraining steps one student whose EMA is its own teacher; distillation steps several students against one frozen
teacher. The trainer sees neither: it asks the run's `RunModels` for the pass every learner shares (the frozen
teacher's outputs, computed once per batch) and each `Learner` for its loss, the module to optimise, what to do
after the optimizer step (an EMA), the state to checkpoint, the backbone to monitor and how to export. Resume,
FSDP2, the monitor, metrics and Slurm then work the same for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dinoforge.launch import DistributedEnv
from dinoforge.models.config import ModelConfig
from pretrain.data.loader import DataConfig
from pretrain.optim import OptimConfig
from pretrain.schedules import ScheduleValues


class Learner(ABC):
    """One model the trainer optimises, with its own optimizer, schedules, checkpoints, metrics and export."""

    name: str  # "" for pretraining's student; a student's name in distillation (prefixes its console lines)
    folder: Path  # where its checkpoints/, export/, metrics.jsonl and tb/ go
    model_cfg: ModelConfig  # its backbone
    optim: OptimConfig  # its optimizer and schedules
    prototypes: int = 0  # K of the targets whose entropy is watched for uniform or collapsed states; 0: no watch

    @abstractmethod
    def trainable(self) -> nn.Module:
        """The module whose parameters the optimizer steps and whose gradients are clipped."""

    @abstractmethod
    def loss(self, batch: dict, shared: Any, values: ScheduleValues) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total (to backpropagate) and detached terms for one micro-batch; `shared` is what
        `RunModels.shared_pass` returned for it."""

    @abstractmethod
    def after_optimizer_step(self, values: ScheduleValues) -> None:
        """What follows a successful optimizer step (the EMA of the student)."""

    @abstractmethod
    def state_module(self) -> nn.Module:
        """Every parameter and buffer a checkpoint must restore (student, EMA, heads, loss centres)."""

    @abstractmethod
    def monitored_backbone(self) -> nn.Module:
        """The backbone the k-NN monitor evaluates and the export writes (a teacher or an EMA)."""

    @abstractmethod
    def flops_per_step(self, batch: dict) -> float:
        """FLOPs of this learner's share of one step on this process (forward + backward)."""

    @abstractmethod
    def export(self, env: DistributedEnv) -> Path:
        """Write the export folder (official backbone layout + heads); every rank must call it."""


@dataclass
class RunModels:
    """What a run trains: the module holding every model (moved, sharded, checkpointed through the learners), its
    learners, the pass they share per micro-batch (None when each learner runs its own teacher), and the loader's
    data config when the models need other crops than the run's `data` section says (None: that section)."""

    module: nn.Module
    learners: list[Learner]
    shared_pass: Callable[[dict, float], Any] | None = None
    shared_flops: Callable[[dict], float] = field(default=lambda batch: 0.0)
    data: DataConfig | None = None
