"""Per-step schedules of SSL pretraining: lr, weight decay, teacher momentum, teacher temperature, last-layer lr.

Each value is computed from the step number alone (no arrays sized by the run length, so a billion-step run costs
nothing and a resumed run needs only its step). The values equal, step for step, DINOv2's precomputed
`CosineScheduler` arrays (`dinov2/utils/utils.py`), so curves and logs compare with the reference directly.
Steps count optimizer steps (not micro-batches), from 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from dinoforge.config import ConfigError
from pretrain.lr_scaling import SCALING_RULES, scaled_lr
from pretrain.optim import OptimConfig

logger = logging.getLogger(__name__)

__all__ = ["SCALING_RULES", "CosineSchedule", "ScheduleValues", "TrainingSchedules", "scaled_lr"]


@dataclass(frozen=True)
class CosineSchedule:
    """0 for `freeze_steps`, then a linear warm-up from `start_warmup_value` reaching `base` on its last step
    (`warmup_steps` steps), then a half cosine from `base` towards `final` over the remaining steps; `final` from
    `total_steps` on. With base == final and total == warm-up it is a linear warm-up then a constant."""

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    start_warmup_value: float = 0.0
    freeze_steps: int = 0

    def __post_init__(self) -> None:
        if min(self.total_steps, self.warmup_steps, self.freeze_steps) < 0:
            raise ValueError(f"schedule step counts must be >= 0, got total_steps={self.total_steps}, "
                             f"warmup_steps={self.warmup_steps}, freeze_steps={self.freeze_steps}")
        if self.warmup_steps + self.freeze_steps > self.total_steps:
            raise ValueError(f"warm-up ({self.warmup_steps} steps) and freeze ({self.freeze_steps} steps) do not fit "
                             f"in the run's {self.total_steps} steps; shorten them or train longer")

    @property
    def decay_steps(self) -> int:
        return self.total_steps - self.warmup_steps - self.freeze_steps

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"schedule step must be >= 0, got {step}")
        if step >= self.total_steps:
            return self.final
        if step < self.freeze_steps:
            return 0.0
        step -= self.freeze_steps
        if step < self.warmup_steps:
            # numpy.linspace(start, base, warmup) of the reference: both ends included, a single step is the start
            if self.warmup_steps == 1:
                return self.start_warmup_value
            return self.start_warmup_value + (self.base - self.start_warmup_value) * step / (self.warmup_steps - 1)
        step -= self.warmup_steps
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * step / self.decay_steps))


@dataclass(frozen=True)
class ScheduleValues:
    """The schedule values of one optimizer step (what the trainer applies and logs)."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_lr: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class TrainingSchedules:
    """Every per-step value of a pretraining run. The heads' last layer follows `lr` except for a learning rate of
    0 during the first `freeze_last_layer_steps` (DINO's trick against early collapse): its schedule is not
    shifted, as in DINOv2."""

    lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    freeze_last_layer_steps: int = 0

    @classmethod
    def from_config(cls, cfg: OptimConfig, total_steps: int, global_batch: int) -> TrainingSchedules:
        """Schedules for a run of `total_steps` optimizer steps of `global_batch` images each (all ranks and
        accumulated micro-batches together; it sets the peak lr through `cfg.scaling_rule`)."""
        if total_steps <= 0:
            raise ConfigError(f"total_steps={total_steps} must be > 0")
        if cfg.warmup_steps > total_steps:
            raise ConfigError(f"optim.warmup_steps={cfg.warmup_steps} is longer than the run (total_steps="
                              f"{total_steps}): lower optim.warmup_steps or raise total_steps")
        for key in ("freeze_last_layer_steps", "warmup_teacher_temp_steps"):
            if getattr(cfg, key) > total_steps:
                logger.warning("optim.%s=%d is longer than the run (%d steps)", key, getattr(cfg, key), total_steps)
        peak = scaled_lr(cfg.base_lr, global_batch, cfg.scaling_rule)
        logger.info("lr %.4g for %d images per step (base_lr %.4g, %s)", peak, global_batch, cfg.base_lr,
                    cfg.scaling_rule)
        temp_steps = cfg.warmup_teacher_temp_steps
        return cls(
            lr=CosineSchedule(peak, cfg.min_lr, total_steps, warmup_steps=cfg.warmup_steps),
            weight_decay=CosineSchedule(cfg.weight_decay, cfg.weight_decay_end, total_steps),
            momentum=CosineSchedule(cfg.momentum_teacher, cfg.final_momentum_teacher, total_steps),
            teacher_temp=CosineSchedule(cfg.teacher_temp, cfg.teacher_temp, temp_steps, warmup_steps=temp_steps,
                                        start_warmup_value=cfg.warmup_teacher_temp),
            freeze_last_layer_steps=cfg.freeze_last_layer_steps,
        )

    def last_layer_lr(self, step: int) -> float:
        return 0.0 if step < self.freeze_last_layer_steps else self.lr(step)

    def at(self, step: int) -> ScheduleValues:
        return ScheduleValues(self.lr(step), self.weight_decay(step), self.momentum(step), self.teacher_temp(step),
                              self.last_layer_lr(step))

    def apply_to_optimizer(self, optimizer: torch.optim.Optimizer, step: int) -> ScheduleValues:
        """Set each param group's lr = lr(step) * lr_multiplier (last_layer_lr for `is_last_layer` groups) and
        weight_decay = wd(step) * wd_multiplier; returns the step's values for logging."""
        values = self.at(step)
        for i, group in enumerate(optimizer.param_groups):
            missing = [k for k in ("lr_multiplier", "wd_multiplier", "is_last_layer") if k not in group]
            if missing:
                raise KeyError(f"optimizer param group {i} has no {', '.join(missing)}; build the optimizer with "
                               f"pretrain.optim.build_optimizer (or groups from pretrain.optim.param_groups)")
            lr = values.last_layer_lr if group["is_last_layer"] else values.lr
            group["lr"] = lr * group["lr_multiplier"]
            group["weight_decay"] = values.weight_decay * group["wd_multiplier"]
        return values
