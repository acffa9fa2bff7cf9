"""The config of a distillation run: a frozen teacher, the objective, and the students it teaches at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from dinoforge.config import ConfigError
from dinoforge.models.config import ModelConfig
from pretrain.meta_arch import LossConfig
from pretrain.train_config import RunConfig

OBJECTIVES = ("dino", "features")


@dataclass
class TeacherConfig(ModelConfig):
    """Where the teacher comes from. A pretrain or distillation run, an export folder or a release folder carries its
    architecture; for a bare weights file (official hub .pth, DINOv2 training checkpoint, timm, Hugging Face) the
    architecture is this section's model keys (`teacher.arch`, `teacher.patch_size`, ...)."""

    weights: str = MISSING
    student: str = ""  # a distillation run with several students: the one that teaches ("" when it has one)
    # The teacher's global-crop side (0: the students'). Larger: the loader cuts global crops at this side, the
    # teacher sees them as they are and the students an antialiased downsampling of the same crops.
    crop_size: int = 0


@dataclass
class FeatureLossConfig:
    """The `features` objective: the student's [CLS] and patch tokens, projected to the teacher's width where they
    differ, against the teacher's (patch grids resampled to the student's)."""

    cls_cosine_weight: float = 1.0
    cls_smooth_l1_weight: float = 1.0
    patch_cosine_weight: float = 1.0
    patch_smooth_l1_weight: float = 1.0
    koleo_loss_weight: float = 0.0  # KoLeo on the student's [CLS] (before the projection)


@dataclass
class StudentConfig:
    """One student: its backbone, its learning rate and its objective's weights."""

    name: str = MISSING
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="vit_small", layerscale=1.0))
    base_lr: float = 0.0  # 0: the run's optim.base_lr
    # `dino`: the student's own heads and loss terms (loss.dino_head sizes the head; its prototypes are the
    # teacher's). DINOv2's distillation has no masking, so the iBOT term covers every patch of the global crops.
    loss: LossConfig = field(default_factory=LossConfig)
    features: FeatureLossConfig = field(default_factory=FeatureLossConfig)


@dataclass
class DistillConfig(RunConfig):
    """`python -m pretrain distill`: every batch runs the teacher once and each student learns from that output."""

    output_dir: str = "runs/distill"
    objective: str = "dino"  # dino: the teacher's heads' targets; features: its tokens (a head-less teacher)
    # The final model of each student is its EMA: momentum cosine from ema_momentum to final_ema_momentum
    ema_momentum: float = 0.99
    final_ema_momentum: float = 1.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    students: list[StudentConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if not self.students:
            raise ConfigError("students is empty: list at least one student, e.g. students: [{name: small, model: "
                              "{arch: vit_small, patch_size: 14}}]")
        names = [s.name for s in self.students]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"students: the name(s) {', '.join(repeated)} appear twice; each student needs its "
                              "own name (it names its folder students/NAME)")
        bad = [n for n in names if not n or "/" in n or n.startswith(".")]
        if bad:
            raise ConfigError(f"students: bad name(s) {bad}: a name is a folder name (no '/', not empty)")
        for key in ("ema_momentum", "final_ema_momentum"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}={getattr(self, key)} must be in [0, 1]")
        if self.teacher.crop_size < 0:
            raise ConfigError(f"teacher.crop_size={self.teacher.crop_size} must be >= 0 (0: the students' size)")
