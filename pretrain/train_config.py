"""The configs of the engine's runs: what every run shares (`RunConfig`: schedule length, precision, data, optimiser,
monitor) and what a pretraining run adds (`TrainConfig`: its model and loss). Distillation adds its teacher and
students instead (`pretrain.distill_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dinoforge.models.config import ModelConfig
from evaluation.monitor import KnnMonitorConfig
from pretrain.data.loader import DataConfig
from pretrain.meta_arch import LossConfig
from pretrain.optim import OptimConfig


@dataclass
class RunConfig:
    """The keys every run of the training engine reads, with the same meaning in `train` and `distill`."""

    name: str = "run"
    output_dir: str = "runs/pretrain"
    seed: int = 0
    total_steps: int = 1000  # the recipe's length; the schedule's step counts are stated for it
    # > 0: the run lasts this many passes over data.dataset instead; total_steps and the schedule's step counts are
    # stretched to that length at the start (pretrain.run_length), and the run saves the resolved values
    epochs: float = 0.0
    max_epoch_images: int = 0  # with epochs: at most this many images in all (a time budget for big folders); 0: none
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 3
    precision: str = "fp32"  # bf16: FSDP2 bf16 params + fp32 reduce when sharded, else bf16 autocast
    activation_checkpointing: bool = False
    compile: bool = False
    max_consecutive_nonfinite: int = 5
    peak_tflops: float = 0.0  # 0: the GPU's data-sheet figure, or a measured matmul rate on CPU
    stop_after_steps: int = 0  # end this process after that many steps (tests: an interrupted run)
    step_gate_dir: str = ""  # tests: before step s, wait while DIR/hold_<s> exists (pretrain.step_gate)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: KnnMonitorConfig = field(default_factory=KnnMonitorConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class TrainConfig(RunConfig):
    """Self-supervised pretraining: one student, its EMA teacher, their heads and the loss terms."""

    init_weights: str = ""  # start from these weights (e.g. the high-resolution phase): run dir or export
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
