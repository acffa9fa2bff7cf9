"""The training loop of `python -m pretrain train` and `distill`: it wires components and holds no maths.

What it steps comes from the run's `RunModels` (`pretrain.learner`): pretraining's student and its EMA teacher, or
distillation's students against one frozen teacher; each learner has its own optimizer, schedules, checkpoints,
metrics and export.

Data order, augmentations, masks and stochastic depth are pure functions of (seed, step, sample position), so a
run resumed from a checkpoint, on any number of processes, continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from dinoforge.collectives import all_reduce_mean
from dinoforge.config import save_config
from dinoforge.launch import DistributedEnv, init_distributed
from dinoforge.models.attention import choose_backend
from dinoforge.precision import autocast
from dinoforge.provenance import code_version
from dinoforge.run_lock import lock_run_folder
from dinoforge.run_logging import setup_logging
from evaluation.monitor import KnnMonitor
from pretrain.checkpoint import (
    Checkpointer,
    DamagedCheckpoint,
    DamagedCheckpointError,
    ModelState,
    OptimizerState,
    RNGState,
)
from pretrain.data.loader import build_pretrain_loader_from_config
from pretrain.data.multicrop import apply_batch_photometric
from pretrain.learner import Learner, RunModels
from pretrain.meta_arch import images_in_batch
from pretrain.metrics import MetricsLogger, format_console
from pretrain.optim import build_optimizer, clip_grad_norm
from pretrain.run_length import resolve_epochs
from pretrain.schedules import TrainingSchedules
from pretrain.signal_watch import SignalWatch
from pretrain.ssl_learner import build_pretraining
from pretrain.step_gate import wait_at_gate
from pretrain.throughput import Throughput, datasheet_peak, device_name, measure_matmul_peak, peak_memory_gib
from pretrain.train_config import RunConfig, TrainConfig

logger = logging.getLogger(__name__)

CONSOLE_KEYS = ("total_loss", "dino_loss", "ibot_loss", "koleo_loss", "cls_loss", "patch_loss", "teacher_entropy",
                "lr", "images_per_s", "mfu")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the run stopped after a checkpoint."""


@dataclass
class LoopState:
    """Everything of the loop that a checkpoint must restore besides modules and optimizer."""

    step: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch RNG seed of one step on one rank (stochastic depth); resume needs no saved RNG state."""
    return (seed * 1_000_003 + step) * 65_537 + rank


@dataclass
class LearnerSlot:
    """The trainer's components for one learner: optimizer, schedules, checkpoints, metrics, signal watch."""

    learner: Learner
    optimizer: torch.optim.Optimizer
    schedules: TrainingSchedules
    checkpointer: Checkpointer
    metrics: MetricsLogger
    signal_watch: SignalWatch | None = None  # made at the first log: it needs the teacher rows a step


class Trainer:
    """Owns the components of one run and runs the step loop over its learners (`pretrain.learner`)."""

    def __init__(self, cfg: RunConfig, build: Callable[[RunConfig, DistributedEnv], RunModels] | None = None) -> None:
        self.env = init_distributed()
        self.cfg = cfg = resolve_epochs(cfg, self.env.world_size)
        self.run_dir = cfg.run_dir
        self.run_lock = lock_run_folder(self.run_dir, self.env.is_main)  # one writer per run folder (run.lock)
        if self.env.is_main:
            save_config(cfg, self.run_dir)
        setup_logging(self.run_dir / "logs" / f"rank{self.env.rank}.log", self.env.rank)
        self.models = (build or build_pretraining)(cfg, self.env)
        self.meta = self.models.module
        self.global_batch = cfg.data.batch_size_per_rank * self.env.world_size * cfg.optim.accumulation_steps
        self.slots = [self._slot(learner) for learner in self.models.learners]
        self.state = LoopState()
        self.monitor = KnnMonitor(cfg.monitor)

    def _slot(self, learner: Learner) -> LearnerSlot:
        cfg = self.cfg
        module = learner.trainable()
        return LearnerSlot(
            learner=learner,
            optimizer=build_optimizer(module, learner.optim, depth=len(module["backbone"].blocks)),
            schedules=TrainingSchedules.from_config(learner.optim, cfg.total_steps, self.global_batch),
            checkpointer=Checkpointer(learner.folder / "checkpoints", keep_last=cfg.keep_last),
            metrics=MetricsLogger(learner.folder, enabled=self.env.is_main))

    # Pretraining's single learner, under the names the tests and tools use.
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.slots[0].optimizer

    @property
    def checkpointer(self) -> Checkpointer:
        return self.slots[0].checkpointer

    @property
    def metrics(self) -> MetricsLogger:
        return self.slots[0].metrics

    def app_state(self, slot: LearnerSlot | None = None) -> dict:
        slot = slot or self.slots[0]
        return {"model": ModelState(slot.learner.state_module()),
                "optimizer": OptimizerState(slot.learner.trainable(), slot.optimizer),
                "loop": self.state, "rng": RNGState()}

    def save(self) -> None:
        for slot in self.slots:
            slot.checkpointer.save(self.state.step, self.app_state(slot))

    def resume(self) -> None:
        """Load the newest checkpoint every learner has intact (damaged ones are passed over, and recorded)."""
        if len(self.slots) == 1:
            slot = self.slots[0]
            if slot.checkpointer.latest_step() is None:
                return
            step = slot.checkpointer.load(self.app_state(slot))
            self._record_damaged(slot, slot.checkpointer.damaged)
        else:
            common = set.intersection(*(set(slot.checkpointer.steps()) for slot in self.slots))
            step = next((s for s in sorted(common, reverse=True) if self._load_all(s)), None)
            if step is None:
                return
        logger.info("resumed from step %d (%s)", step, self.run_dir)

    def _load_all(self, step: int) -> bool:
        """Load `step` into every learner; False (with a warning) when one of them is damaged there."""
        for slot in self.slots:
            try:
                slot.checkpointer.load(self.app_state(slot), step=step)
            except DamagedCheckpointError as err:
                logger.warning("checkpoint step %d of %s is damaged (%s); trying an older step", step,
                               slot.learner.folder, err)
                self._record_damaged(slot, [DamagedCheckpoint(step, err.path or slot.checkpointer.step_dir(step),
                                                              str(err))])
                return False
        return True

    def _record_damaged(self, slot: LearnerSlot, damaged: list[DamagedCheckpoint]) -> None:
        for item in damaged:
            slot.metrics.note(self.state.step, {"damaged_checkpoint": str(item.path), "damage": item.problem})

    def autocast(self):
        """bf16 autocast for an unsharded model (one process, CPU or GPU); sharded models compute in bf16 through
        their FSDP2 MixedPrecisionPolicy."""
        if self.env.world_size > 1:
            return contextlib.nullcontext()
        return autocast(self.env.device, self.cfg.precision)

    def train_step(self, micro_batches: list[dict]) -> tuple[list[bool], list[dict[str, torch.Tensor]]]:
        """One optimizer step of every learner over `micro_batches` (gradient accumulation): per learner, whether
        its step was taken (False: skipped for a non-finite loss or gradient) and its averaged statistics."""
        values = [slot.schedules.apply_to_optimizer(slot.optimizer, self.state.step) for slot in self.slots]
        for slot in self.slots:
            slot.optimizer.zero_grad(set_to_none=True)
        totals: list[dict[str, torch.Tensor]] = [{} for _ in self.slots]
        for batch in micro_batches:
            shared = None
            if self.models.shared_pass is not None:
                with self.autocast():
                    shared = self.models.shared_pass(batch, values[0].teacher_temp)
            for slot, slot_values, slot_totals in zip(self.slots, values, totals, strict=True):
                with self.autocast():
                    loss, stats = slot.learner.loss(batch, shared, slot_values)
                (loss / len(micro_batches)).backward()
                for key, value in {"total_loss": loss.detach(), **stats}.items():
                    slot_totals[key] = slot_totals.get(key, 0) + value / len(micro_batches)
        taken = []
        for slot, slot_values, slot_totals in zip(self.slots, values, totals, strict=True):
            module = slot.learner.trainable()
            grad_norm = clip_grad_norm(module, slot.learner.optim.clip_grad, slot.learner.optim.clip_per_module)
            # every rank decides the same: skip if any rank saw a non-finite loss or gradient
            finite = all_reduce_mean(
                torch.isfinite(slot_totals["total_loss"] + grad_norm).float().to(self.env.device)) == 1
            if finite:
                slot.optimizer.step()
                slot.learner.after_optimizer_step(slot_values)
            else:
                slot.optimizer.zero_grad(set_to_none=True)
            slot_totals.update({k: all_reduce_mean(v.float()) for k, v in slot_totals.items()})
            slot_totals["grad_norm"] = grad_norm.detach()
            taken.append(bool(finite))
        return taken, totals

    def fit(self) -> Path:
        cfg, env = self.cfg, self.env
        self.resume()
        model_cfg = self.models.learners[0].model_cfg
        backend, why = choose_backend(model_cfg.attn_backend, env.device, compute_dtype(cfg.precision))
        for slot in self.slots:
            # what the model card reports about the run's compute and code (`python -m pretrain release`)
            facts = {"attention_backend": backend, "attention_reason": why, "device": device_name(env.device),
                     "world_size": env.world_size, "precision": cfg.precision,
                     "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "dinoforge_commit": code_version()["commit"]}
            if slot.learner.prototypes:  # K of the watched targets: `pretrain plot` draws log K from it
                facts["prototypes"] = slot.learner.prototypes
            slot.metrics.note(self.state.step, facts)
        accumulation = cfg.optim.accumulation_steps
        loader, sampler = build_pretrain_loader_from_config(self.models.data or cfg.data, rank=env.rank,
                                                            world=env.world_size, seed=cfg.seed,
                                                            start_step=self.state.step * accumulation,
                                                            patch_size=model_cfg.patch_size)
        if sampler is not None:  # streamed shards have no length
            for slot in self.slots:
                slot.metrics.note(self.state.step, {"dataset_images": sampler.dataset_len})
        batches = iter(loader)
        throughput: Throughput | None = None
        end = cfg.total_steps
        if cfg.stop_after_steps:
            end = min(end, self.state.step + cfg.stop_after_steps)
        bar = tqdm(total=cfg.total_steps, initial=self.state.step, disable=not env.is_main,
                   desc="distill" if self.slots[0].learner.name else "train", dynamic_ncols=True)
        self.meta.train()
        while self.state.step < end:
            wait_at_gate(cfg.step_gate_dir, self.state.step, env.is_main)  # tests: hold before a step
            t0 = time.perf_counter()
            micro = [apply_batch_photometric(_to_device(next(batches), env.device), cfg.data.multicrop)
                     for _ in range(accumulation)]
            t_data = time.perf_counter() - t0
            if throughput is None:
                flops = self.models.shared_flops(micro[0]) + sum(s.learner.flops_per_step(micro[0])
                                                                  for s in self.slots)
                throughput = self._throughput(flops * accumulation)
            torch.manual_seed(step_seed(cfg.seed, self.state.step, env.rank))
            taken, stats = self.train_step(micro)
            self._after_step(taken, stats, micro, throughput, time.perf_counter() - t0, t_data)
            bar.update(1)
        bar.close()
        if self.state.step >= cfg.total_steps:
            self.save()
            for slot in self.slots:
                slot.learner.export(env)
        for slot in self.slots:
            slot.metrics.close()
        return self.run_dir

    def _throughput(self, flops: float) -> Throughput:
        """MFU against `peak_tflops`, else the data sheet, else a matmul rate measured at the first logs."""
        cfg, device = self.cfg, self.env.device
        peak = cfg.peak_tflops * 1e12 or datasheet_peak(device, cfg.precision)
        if peak:
            return Throughput(flops, peak, self.env.world_size)
        return Throughput(flops, 0.0, self.env.world_size,
                          measure=lambda: measure_matmul_peak(device, compute_dtype(cfg.precision), seconds=0.2))

    def _watch_signal(self, slot: LearnerSlot, step: int, values: dict[str, float], rows: int) -> None:
        """Warn once, and record in metrics.jsonl, when the teacher's targets are uniform or collapsed."""
        if not slot.learner.prototypes or "teacher_entropy" not in values:
            return
        if slot.signal_watch is None:
            slot.signal_watch = SignalWatch(slot.learner.prototypes, rows, slot.learner.optim.warmup_steps)
        for problem in slot.signal_watch.check(step, values["teacher_entropy"], values["teacher_mean_entropy"]):
            slot.metrics.note(step, {"signal_problem": problem.shape, "signal_message": problem.message})

    def _after_step(self, taken: list[bool], stats: list[dict], micro: list[dict], throughput: Throughput,
                    step_seconds: float, data_seconds: float) -> None:
        cfg = self.cfg
        step = self.state.step
        if all(taken):
            self.state.consecutive_nonfinite = 0
        else:
            self.state.consecutive_nonfinite += 1
            self.state.skipped_steps += 1
            skipped = [slot.learner.name or "the student" for slot, ok in zip(self.slots, taken, strict=True)
                       if not ok]
            logger.warning("step %d: non-finite loss or gradient, step skipped for %s (%d in a row, %d in total)",
                           step, ", ".join(skipped), self.state.consecutive_nonfinite, self.state.skipped_steps)
        self.state.step += 1
        if step % cfg.log_every == 0 or self.state.step == cfg.total_steps:
            images = sum(images_in_batch(b) for b in micro)
            common = {**throughput.stats(images, step_seconds, data_seconds), "skipped_steps": self.state.skipped_steps,
                      "decode_errors": sum(int(b.get("n_decode_errors", 0)) for b in micro),
                      "peak_memory_gib": peak_memory_gib(self.env.device)}
            rows = micro[0]["global_crops"].shape[0] * self.env.world_size
            for slot, slot_stats in zip(self.slots, stats, strict=True):
                values = {**slot_stats, **slot.schedules.at(step).as_dict(), **common}
                values = slot.metrics.log(step, values)
                self._watch_signal(slot, step, values, rows)
                name = f"[{slot.learner.name}] " if slot.learner.name else ""
                logger.info(name + format_console(step, cfg.total_steps, values, CONSOLE_KEYS))
        if self.state.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
            self.save()
            raise NonFiniteLossError(
                f"{self.state.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient (last at "
                f"step {step}); stopped after saving checkpoint step {self.state.step} under {self.run_dir}. Lower "
                f"optim.base_lr, raise optim.warmup_steps or check the data, then resume; or raise "
                f"max_consecutive_nonfinite."
            )
        for slot in self.slots:
            knn = self.monitor.maybe_run(slot.learner.monitored_backbone(), self.state.step)
            if knn:
                slot.metrics.log(step, knn)
        if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
            self.save()


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the matmuls (and attention) of a run: bf16 under autocast or FSDP2 bf16 params."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


# The batched photometric parameters stay on the CPU: `apply_photometric` reads them on the host to choose which
# crops each operation touches, so a device copy would cost a blocking copy back every step.
HOST_KEYS = ("global_photometric", "local_photometric")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v
            for k, v in batch.items()}


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) the pretraining run of `cfg`; returns its run directory."""
    if cfg.epochs < 0:
        raise ValueError(f"epochs must be >= 0 (0: the run lasts total_steps), got {cfg.epochs}")
    if cfg.total_steps <= 0:
        raise ValueError(f"total_steps must be a positive integer, got {cfg.total_steps}")
    return Trainer(cfg).fit()
