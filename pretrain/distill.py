"""`python -m pretrain distill CONFIG`: a frozen teacher taught to any number of students in one run.

Every batch runs the teacher once; each student learns from that output with its own optimizer, schedules, EMA,
checkpoints (`RUN/students/NAME/checkpoints`), metrics and export (`RUN/students/NAME/export`, the format of a
pretrain export, so evaluation, curation embedding and release take it unchanged). The loop, resume, FSDP2, the k-NN
monitor and Slurm are the training engine's (`pretrain.train.Trainer`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from dinoforge.launch import DistributedEnv
from dinoforge.models.config import ModelConfig, build_backbone
from dinoforge.models.flops import count_forward_flops, train_step_flops
from pretrain.distill_arch import DistillMetaArch, StudentUnit, TeacherOutputs
from pretrain.distill_config import DistillConfig, StudentConfig
from pretrain.distributed import ema_update, parallelize
from pretrain.export import export_model
from pretrain.learner import Learner, RunModels
from pretrain.schedules import ScheduleValues
from pretrain.teacher import STUDENTS_DIR, load_teacher
from pretrain.train import Trainer

logger = logging.getLogger(__name__)


def _head_weights(module: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if not name.startswith("backbone."))


class StudentLearner(Learner):
    """One student of a distillation run; its EMA is the model it exports."""

    def __init__(self, meta: DistillMetaArch, cfg: DistillConfig, student: StudentConfig) -> None:
        self.meta, self.unit = meta, meta.units[student.name]
        self.name = student.name
        self.folder = cfg.run_dir / STUDENTS_DIR / student.name
        self.model_cfg = student.model
        self.optim = copy.deepcopy(cfg.optim)
        if student.base_lr:
            self.optim.base_lr = student.base_lr
        self.optim.momentum_teacher, self.optim.final_momentum_teacher = cfg.ema_momentum, cfg.final_ema_momentum
        self.prototypes = self.unit.prototypes

    def trainable(self) -> torch.nn.Module:
        return self.unit.student

    def loss(self, batch: dict, shared: TeacherOutputs, values: ScheduleValues):
        return self.meta.student_loss(self.name, batch, shared)

    def after_optimizer_step(self, values: ScheduleValues) -> None:
        ema_update(self.unit.ema, self.unit.student, values.momentum)

    def state_module(self) -> StudentUnit:
        return self.unit

    def monitored_backbone(self) -> torch.nn.Module:
        return self.unit.ema["backbone"]

    def flops_per_step(self, batch: dict) -> float:
        """Student forward + backward on its crops (global and local under `dino`, global under `features`)."""
        with torch.device("meta"):
            backbone = build_backbone(self.model_cfg, drop_path=False)
        side = self.meta.student_side
        globals_ = (batch["global_crops"].shape[0], 3, side, side)
        crops = [globals_]
        if self.meta.objective == "dino" and batch["local_crops"].shape[0]:
            crops.append(tuple(batch["local_crops"].shape))
        rows = sum(c[0] for c in crops)
        if self.meta.objective == "dino":
            rows += batch["global_crops"].shape[0] * (side // self.model_cfg.patch_size) ** 2
        return train_step_flops(backbone, crops) + 3 * 2 * _head_weights(self.unit.student) * rows

    def export(self, env: DistributedEnv) -> Path:
        return export_model(self.unit.exported(), self.model_cfg, self.folder / "export", env)


def _teacher_flops(meta: DistillMetaArch, batch: dict) -> float:
    with torch.device("meta"):
        backbone = build_backbone(meta.teacher_model, drop_path=False)
    flops = count_forward_flops(backbone, [tuple(batch["global_crops"].shape)])
    if meta.objective == "dino":
        grid = batch["global_crops"].shape[-1] // meta.teacher_model.patch_size
        flops += 2 * _head_weights(meta.teacher) * batch["global_crops"].shape[0] * (1 + grid * grid)
    return flops


def _parameters(model: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_backbone(model, drop_path=False).parameters())


def build_distillation(cfg: DistillConfig, env: DistributedEnv) -> RunModels:
    """The teacher and students of `cfg` on the run's device, sharded; the loader's crops for both."""
    teacher, teacher_model = load_teacher(cfg.teacher, need_heads=cfg.objective == "dino")
    teacher_params = sum(p.numel() for p in teacher["backbone"].parameters())
    for student in cfg.students:
        params = _parameters(student.model)
        if params > teacher_params:
            logger.warning("student %r has more parameters than its teacher (%.1fM > %.1fM): distillation usually "
                           "teaches a smaller model", student.name, params / 1e6, teacher_params / 1e6)
    meta = DistillMetaArch(cfg, teacher, teacher_model)
    meta.to(env.device)
    parallelize(meta.teacher, env, cfg.precision, compile=cfg.compile)  # sharded like the students when it is large
    for unit in meta.units.values():
        for side in (unit.student, unit.ema):
            parallelize(side, env, cfg.precision, cfg.activation_checkpointing and side is unit.student, cfg.compile)
    data = copy.deepcopy(cfg.data)
    data.mask_probability = 0.0  # DINOv2's distillation masks nothing: iBOT sees every patch
    data.multicrop.global_crops_size = max(cfg.teacher.crop_size, cfg.data.multicrop.global_crops_size)
    learners = [StudentLearner(meta, cfg, student) for student in cfg.students]
    return RunModels(module=meta, learners=learners, shared_pass=meta.teacher_pass,
                     shared_flops=lambda batch: _teacher_flops(meta, batch), data=data)


def distill(cfg: DistillConfig) -> Path:
    """Run (or resume) the distillation run of `cfg`; returns its run directory."""
    if cfg.total_steps <= 0:
        raise ValueError(f"total_steps must be a positive integer, got {cfg.total_steps}")
    return Trainer(cfg, build_distillation).fit()


def export_students(run_dir: str | Path, step: int | None = None) -> list[Path]:
    """Export every student of a distillation run from its checkpoint (the newest, or `step`) to
    RUN/students/NAME/export, in one process; the teacher must still be where the run's config says."""
    from dinoforge.config import load_config
    from dinoforge.launch import init_distributed
    from pretrain.checkpoint import Checkpointer, ModelState

    run_dir = Path(run_dir)
    cfg = load_config(DistillConfig, run_dir / "config.yaml")
    teacher, teacher_model = load_teacher(cfg.teacher, need_heads=cfg.objective == "dino")
    meta = DistillMetaArch(cfg, teacher, teacher_model)
    env, exported = init_distributed(), []
    for student in cfg.students:
        folder = run_dir / STUDENTS_DIR / student.name
        checkpointer = Checkpointer(folder / "checkpoints")
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"{folder}: no complete checkpoint under checkpoints/ to export")
        loaded = checkpointer.load({"model": ModelState(meta.units[student.name])}, step=step)
        logger.info("loaded step %d of student %s", loaded, student.name)
        exported.append(export_model(meta.units[student.name].exported(), student.model, folder / "export", env))
    return exported
