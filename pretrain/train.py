"""`python -m pretrain train CONFIG`: the SSL training loop, wiring components and holding no maths.

Data order, augmentations, masks and stochastic depth are pure functions of (seed, step, sample position), so a
run resumed from a checkpoint, on any number of processes, continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dinoforge.collectives import all_reduce_mean
from dinoforge.config import save_config
from dinoforge.launch import DistributedEnv, init_distributed
from dinoforge.models.attention import choose_backend
from dinoforge.models.config import build_backbone
from dinoforge.models.flops import train_step_flops
from dinoforge.precision import autocast
from dinoforge.run_logging import setup_logging
from evaluation.monitor import KnnMonitor
from pretrain.checkpoint import Checkpointer, ModelState, OptimizerState, RNGState
from pretrain.data.loader import build_pretrain_loader_from_config
from pretrain.data.multicrop import apply_batch_photometric
from pretrain.distributed import apply_activation_checkpointing, apply_compile, apply_fsdp, ema_update
from pretrain.export import export_teacher
from pretrain.initial_weights import load_initial_weights
from pretrain.meta_arch import SSLMetaArch, images_in_batch
from pretrain.metrics import MetricsLogger, format_console
from pretrain.optim import build_optimizer, clip_grad_norm
from pretrain.run_length import resolve_epochs
from pretrain.schedules import TrainingSchedules
from pretrain.signal_watch import SignalWatch
from pretrain.throughput import Throughput, datasheet_peak, measure_matmul_peak, peak_memory_gib
from pretrain.train_config import TrainConfig

logger = logging.getLogger(__name__)


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


def build_meta_arch(cfg: TrainConfig, env: DistributedEnv) -> SSLMetaArch:
    # Same seed on every rank: FSDP2 keeps each rank's shard of its own initialisation, so they must agree.
    torch.manual_seed(cfg.seed)
    meta = SSLMetaArch(cfg.model, cfg.loss)
    if cfg.init_weights:
        load_initial_weights(meta, cfg.init_weights)
    meta.to(env.device)
    for side in (meta.student, meta.teacher):
        blocks = side["backbone"].blocks
        if cfg.activation_checkpointing and side is meta.student:
            apply_activation_checkpointing(blocks)
        if cfg.compile:
            apply_compile(blocks)
        apply_fsdp(side, blocks, env, param_dtype=cfg.precision)
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


class Trainer:
    """Owns the components of one run and runs the step loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.env = init_distributed()
        self.cfg = cfg = resolve_epochs(cfg, self.env.world_size)
        self.run_dir = cfg.run_dir
        if self.env.is_main:
            save_config(cfg, self.run_dir)
        setup_logging(self.run_dir / "logs" / f"rank{self.env.rank}.log", self.env.rank)
        self.meta = build_meta_arch(cfg, self.env)
        self.optimizer = build_optimizer(self.meta.student, cfg.optim, depth=len(self.meta.student["backbone"].blocks))
        self.global_batch = cfg.data.batch_size_per_rank * self.env.world_size * cfg.optim.accumulation_steps
        self.schedules = TrainingSchedules.from_config(cfg.optim, cfg.total_steps, self.global_batch)
        self.state = LoopState()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep_last=cfg.keep_last)
        self.metrics = MetricsLogger(self.run_dir, enabled=self.env.is_main)
        self.monitor = KnnMonitor(cfg.monitor)
        self.signal_watch: SignalWatch | None = None  # made at the first log: it needs the teacher rows a step

    def app_state(self) -> dict:
        return {"model": ModelState(self.meta), "optimizer": OptimizerState(self.meta.student, self.optimizer),
                "loop": self.state, "rng": RNGState()}

    def resume(self) -> None:
        if self.checkpointer.latest_step() is not None:
            step = self.checkpointer.load(self.app_state())
            logger.info("resumed from step %d (%s)", step, self.checkpointer.root)

    def autocast(self):
        """bf16 autocast for an unsharded model (one process, CPU or GPU); sharded models compute in bf16 through
        their FSDP2 MixedPrecisionPolicy."""
        if self.env.world_size > 1:
            return contextlib.nullcontext()
        return autocast(self.env.device, self.cfg.precision)

    def train_step(self, micro_batches: list[dict]) -> tuple[bool, dict[str, torch.Tensor]]:
        """One optimizer step over `micro_batches` (gradient accumulation); False when it was skipped."""
        values = self.schedules.apply_to_optimizer(self.optimizer, self.state.step)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            with self.autocast():
                loss, stats = self.meta.compute_losses(batch, values.teacher_temp)
            (loss / len(micro_batches)).backward()
            for key, value in {"total_loss": loss.detach(), **stats}.items():
                totals[key] = totals.get(key, 0) + value / len(micro_batches)
        grad_norm = clip_grad_norm(self.meta.student, self.cfg.optim.clip_grad, self.cfg.optim.clip_per_module)
        # every rank decides the same: skip if any rank saw a non-finite loss or gradient
        finite = all_reduce_mean(torch.isfinite(totals["total_loss"] + grad_norm).float().to(self.env.device)) == 1
        if finite:
            self.optimizer.step()
            ema_update(self.meta.teacher, self.meta.student, values.momentum)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        totals = {k: all_reduce_mean(v.float()) for k, v in totals.items()}
        totals["grad_norm"] = grad_norm.detach()
        return bool(finite), totals

    def fit(self) -> Path:
        cfg, env = self.cfg, self.env
        self.resume()
        backend, why = choose_backend(cfg.model.attn_backend, env.device, compute_dtype(cfg.precision))
        self.metrics.note(self.state.step, {"attention_backend": backend, "attention_reason": why})
        accumulation = cfg.optim.accumulation_steps
        loader, _ = build_pretrain_loader_from_config(cfg.data, rank=env.rank, world=env.world_size, seed=cfg.seed,
                                                      start_step=self.state.step * accumulation,
                                                      patch_size=cfg.model.patch_size)
        batches = iter(loader)
        throughput: Throughput | None = None
        end = cfg.total_steps
        if cfg.stop_after_steps:
            end = min(end, self.state.step + cfg.stop_after_steps)
        bar = tqdm(total=cfg.total_steps, initial=self.state.step, disable=not env.is_main, desc="train",
                   dynamic_ncols=True)
        self.meta.train()
        while self.state.step < end:
            t0 = time.perf_counter()
            micro = [apply_batch_photometric(_to_device(next(batches), env.device), cfg.data.multicrop)
                     for _ in range(accumulation)]
            t_data = time.perf_counter() - t0
            if throughput is None:
                throughput = self._throughput(flops_per_step(self.meta, micro[0]) * accumulation)
            torch.manual_seed(step_seed(cfg.seed, self.state.step, env.rank))
            finite, stats = self.train_step(micro)
            self._after_step(finite, stats, micro, throughput, time.perf_counter() - t0, t_data)
            bar.update(1)
        bar.close()
        if self.state.step >= cfg.total_steps:
            self.checkpointer.save(self.state.step, self.app_state())
            export_teacher(self.meta, self.run_dir / "export", env)
        self.metrics.close()
        return self.run_dir

    def _throughput(self, flops: float) -> Throughput:
        """MFU against `peak_tflops`, else the data sheet, else a matmul rate measured at the first logs."""
        cfg, device = self.cfg, self.env.device
        peak = cfg.peak_tflops * 1e12 or datasheet_peak(device, cfg.precision)
        if peak:
            return Throughput(flops, peak, self.env.world_size)
        return Throughput(flops, 0.0, self.env.world_size,
                          measure=lambda: measure_matmul_peak(device, compute_dtype(cfg.precision), seconds=0.2))

    def _watch_signal(self, step: int, values: dict[str, float], rows: int) -> None:
        """Warn once, and record in metrics.jsonl, when the teacher's targets are uniform or collapsed."""
        if self.signal_watch is None:
            self.signal_watch = SignalWatch(self.cfg.loss.dino_head.out_dim, rows, self.cfg.optim.warmup_steps)
        if "teacher_entropy" in values:
            for problem in self.signal_watch.check(step, values["teacher_entropy"], values["teacher_mean_entropy"]):
                self.metrics.note(step, {"signal_problem": problem.shape, "signal_message": problem.message})

    def _after_step(self, finite: bool, stats: dict, micro: list[dict], throughput: Throughput,
                    step_seconds: float, data_seconds: float) -> None:
        cfg = self.cfg
        step = self.state.step
        if finite:
            self.state.consecutive_nonfinite = 0
        else:
            self.state.consecutive_nonfinite += 1
            self.state.skipped_steps += 1
            logger.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in total)", step,
                           self.state.consecutive_nonfinite, self.state.skipped_steps)
        self.state.step += 1
        if step % cfg.log_every == 0 or self.state.step == cfg.total_steps:
            images = sum(images_in_batch(b) for b in micro)
            values = {**stats, **self.schedules.at(step).as_dict(),
                      **throughput.stats(images, step_seconds, data_seconds), "skipped_steps": self.state.skipped_steps,
                      "decode_errors": sum(int(b.get("n_decode_errors", 0)) for b in micro)}
            values["peak_memory_gib"] = peak_memory_gib(self.env.device)
            values = self.metrics.log(step, values)
            self._watch_signal(step, values, rows=micro[0]["global_crops"].shape[0] * self.env.world_size)
            logger.info(format_console(step, cfg.total_steps, values, (
                "total_loss", "dino_loss", "ibot_loss", "koleo_loss", "teacher_entropy", "lr", "images_per_s", "mfu")))
        if self.state.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
            path = self.checkpointer.save(self.state.step, self.app_state())
            raise NonFiniteLossError(
                f"{self.state.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient (last at "
                f"step {step}); stopped after saving {path}. Lower optim.base_lr, raise optim.warmup_steps or check "
                f"the data, then resume; or raise max_consecutive_nonfinite."
            )
        knn = self.monitor.maybe_run(self.meta.teacher["backbone"], self.state.step)
        if knn:
            self.metrics.log(step, knn)
        if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
            self.checkpointer.save(self.state.step, self.app_state())


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the matmuls (and attention) of a run: bf16 under autocast or FSDP2 bf16 params."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) the pretraining run of `cfg`; returns its run directory."""
    if cfg.epochs < 0:
        raise ValueError(f"epochs must be >= 0 (0: the run lasts total_steps), got {cfg.epochs}")
    if cfg.total_steps <= 0:
        raise ValueError(f"total_steps must be a positive integer, got {cfg.total_steps}")
    return Trainer(cfg).fit()
