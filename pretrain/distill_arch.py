"""Distillation's models and maths: one frozen teacher, any number of students, each with its EMA.

`DistillMetaArch.teacher_pass(batch, teacher_temp)` runs the teacher once per batch; `student_loss(name, batch,
teacher)` is one student's objective on that output:
- `dino` (DINOv2's distillation, its paper's section 5): the teacher's heads give Sinkhorn-Knopp-centred targets for
  the [CLS] of the global crops and for every patch token of them (no masking); the student, with heads of its own,
  learns them through the pretraining loss terms (`loss.terms`: DINO over global and local crops, iBOT, KoLeo).
- `features` (a teacher without heads, e.g. an official release): the student's [CLS] and patch tokens, projected to
  the teacher's width, regress the teacher's (cosine + smooth L1), patch grids resampled; optional KoLeo.
It knows nothing of optimisers, schedules or process groups.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoforge.models.config import ModelConfig, build_backbone
from dinoforge.models.heads import DINOHead
from pretrain.distill_config import DistillConfig, StudentConfig
from pretrain.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp
from pretrain.losses.feature_distill import FeatureProjection, resample_patch_grid, token_distance
from pretrain.losses.terms import StepOutputs, build_terms, weighted_total
from pretrain.meta_arch import head_logits, target_entropies


def student_seed(seed: int, name: str) -> int:
    """The initialisation seed of student `name`: the same in a run alone or beside other students."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@dataclass
class TeacherOutputs:
    """The teacher's view of one batch, shared by every student."""

    student_globals: Tensor  # the global crops at the students' side
    cls: Tensor  # [n_global * B, D_t] normalised [CLS] tokens
    patches: Tensor  # [n_global * B, N_t, D_t] normalised patch tokens
    n_global: int
    teacher_temp: float
    cls_targets: list[Tensor] | None = None  # dino: one [B, K] target per global crop
    patch_targets: dict[int, Tensor] = field(default_factory=dict)  # dino: grid side -> [n_global*B*side^2, K]


class StudentLosses(nn.Module):
    """One student's loss modules, under the names the pretraining loss terms read (`dino_loss`, ...)."""

    def __init__(self, prototypes: int, cfg: StudentConfig) -> None:
        super().__init__()
        self.dino_loss = DINOLoss(prototypes, cfg.loss.student_temp)
        self.ibot_patch_loss = iBOTPatchLoss(prototypes, cfg.loss.student_temp)
        self.koleo_loss = KoLeoLoss()


class StudentUnit(nn.Module):
    """A student (`student`: backbone + heads or projection), its EMA (`ema`, the model exported) and its losses."""

    def __init__(self, cfg: StudentConfig, objective: str, teacher: nn.ModuleDict) -> None:
        super().__init__()
        self.cfg, self.objective = cfg, objective
        backbone = build_backbone(cfg.model)
        modules: dict[str, nn.Module] = {"backbone": backbone}
        prototypes = 0
        if objective == "dino":
            prototypes = teacher["dino_head"].last_layer.out_features
            for name, head_cfg in (("dino_head", cfg.loss.dino_head), ("ibot_head", cfg.loss.ibot_head)):
                if name == "dino_head" or cfg.loss.ibot_separate_head:
                    modules[name] = DINOHead(backbone.embed_dim, prototypes, nlayers=head_cfg.nlayers,
                                             hidden_dim=head_cfg.hidden_dim, bottleneck_dim=head_cfg.bottleneck_dim)
        else:
            modules["projection"] = FeatureProjection(backbone.embed_dim, teacher["backbone"].embed_dim)
        self.student = nn.ModuleDict(modules)
        self.ema = copy.deepcopy(self.student)
        self.ema.requires_grad_(False)
        self.losses = StudentLosses(max(prototypes, 1), cfg)
        self.terms = build_terms(cfg.loss, self.losses) if objective == "dino" else []
        self.prototypes = prototypes

    def train(self, mode: bool = True) -> StudentUnit:
        super().train(mode)
        self.ema.eval()
        return self

    def exported(self) -> nn.ModuleDict:
        """What the export writes: the EMA's backbone and its DINO/iBOT heads (a projection is not a head)."""
        return nn.ModuleDict({k: v for k, v in self.ema.items() if k != "projection"})


class DistillMetaArch(nn.Module):
    """`teacher` (frozen ModuleDict) and `units` (one StudentUnit per student, by name)."""

    def __init__(self, cfg: DistillConfig, teacher: nn.ModuleDict, teacher_model: ModelConfig) -> None:
        super().__init__()
        self.objective = cfg.objective
        self.teacher_model = teacher_model
        self.teacher = teacher
        self.student_side = cfg.data.multicrop.global_crops_size
        units = {}
        for student in cfg.students:
            torch.manual_seed(student_seed(cfg.seed, student.name))
            units[student.name] = StudentUnit(student, cfg.objective, teacher)
        self.units = nn.ModuleDict(units)

    def train(self, mode: bool = True) -> DistillMetaArch:
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout or drop path, fixed norms
        for unit in self.units.values():
            unit.ema.eval()
        return self

    @torch.no_grad()
    def teacher_pass(self, batch: dict, teacher_temp: float) -> TeacherOutputs:
        """The teacher's tokens for the global crops (and its [CLS] targets under `dino`), once per batch."""
        crops = batch["global_crops"]
        out = self.teacher["backbone"].forward_features(crops)
        students = crops
        if crops.shape[-1] != self.student_side:  # the teacher sees the crops at a higher resolution
            students = F.interpolate(crops.float(), size=(self.student_side, self.student_side), mode="bilinear",
                                     antialias=True, align_corners=False).to(crops.dtype)
        n_global = int(batch.get("n_global_crops", 2))
        result = TeacherOutputs(students, out["x_norm_clstoken"], out["x_norm_patchtokens"], n_global, teacher_temp)
        if self.objective == "dino":
            logits = self.teacher["dino_head"](result.cls)
            result.cls_targets = list(sinkhorn_knopp(logits, teacher_temp).chunk(n_global))
        return result

    @torch.no_grad()
    def patch_targets(self, teacher: TeacherOutputs, side: int) -> Tensor:
        """Sinkhorn-Knopp targets of every teacher patch token on a side x side grid (computed once per grid)."""
        if side not in teacher.patch_targets:
            patches = resample_patch_grid(teacher.patches, side).flatten(0, 1)
            head = self.teacher["ibot_head"] if "ibot_head" in self.teacher else self.teacher["dino_head"]
            teacher.patch_targets[side] = sinkhorn_knopp(head(patches), teacher.teacher_temp)
        return teacher.patch_targets[side]

    def student_loss(self, name: str, batch: dict, teacher: TeacherOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Student `name`'s weighted total loss and its detached terms for one batch."""
        unit = self.units[name]
        if self.objective == "dino":
            return self._dino_loss(unit, batch, teacher)
        return self._feature_loss(unit, teacher)

    def _dino_loss(self, unit: StudentUnit, batch: dict, teacher: TeacherOutputs) -> tuple[Tensor, dict]:
        backbone = unit.student["backbone"]
        crops = [teacher.student_globals, batch["local_crops"]]
        if unit.cfg.model.sequence_packing:
            global_out, local_out = backbone(crops, masks=[None, None], is_training=True)
        else:
            global_out, local_out = (backbone(c, is_training=True) for c in crops)
        patches = global_out["x_norm_patchtokens"]
        cls = torch.cat([global_out["x_norm_clstoken"], local_out["x_norm_clstoken"]])
        cls_logits, patch_logits = head_logits(unit.student, cls, patches.flatten(0, 1))
        n_images = teacher.cls_targets[0].shape[0]
        n_local = local_out["x_norm_clstoken"].shape[0] // n_images
        outputs = StepOutputs(
            n_global_crops=teacher.n_global, student_global=global_out, student_local=local_out,
            student_cls_logits=list(cls_logits.chunk(teacher.n_global + n_local)), student_patch_logits=patch_logits,
            teacher_cls=teacher.cls_targets,
            teacher_patch=self.patch_targets(teacher, math.isqrt(patches.shape[1])))
        # iBOT on every patch of both global crops: each token weighs 1 / (patches per crop), as a fully masked crop
        term_batch = {"global_crops": teacher.student_globals,
                      "masks_weight": patch_logits.new_full((patch_logits.shape[0],), 1.0 / patches.shape[1])}
        total, stats = weighted_total(unit.terms, outputs, term_batch, teacher.teacher_temp)
        stats["teacher_entropy"], stats["teacher_mean_entropy"] = target_entropies(torch.cat(teacher.cls_targets))
        return total, stats

    def _feature_loss(self, unit: StudentUnit, teacher: TeacherOutputs) -> tuple[Tensor, dict]:
        weights = unit.cfg.features
        out = unit.student["backbone"].forward_features(teacher.student_globals)
        side = math.isqrt(out["x_norm_patchtokens"].shape[1])
        cls, patches = unit.student["projection"](out["x_norm_clstoken"], out["x_norm_patchtokens"])
        cls_loss = token_distance(cls, teacher.cls, weights.cls_cosine_weight, weights.cls_smooth_l1_weight)
        patch_loss = token_distance(patches, resample_patch_grid(teacher.patches, side), weights.patch_cosine_weight,
                                    weights.patch_smooth_l1_weight)
        total = cls_loss + patch_loss
        stats = {"cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach()}
        if weights.koleo_loss_weight:
            koleo = sum(unit.losses.koleo_loss(c) for c in out["x_norm_clstoken"].chunk(teacher.n_global))
            total = total + weights.koleo_loss_weight * koleo
            stats["koleo_loss"] = koleo.detach()
        return total, stats
