"""DINOv2's self-distillation setup: a student and its EMA teacher, each a ViT with DINO (+ iBOT) heads.

`SSLMetaArch.compute_losses(batch, teacher_temp)` turns one collated multi-crop batch into the weighted sum of the
DINO, iBOT and KoLeo losses. It knows nothing of optimisers, schedules or process groups: the trainer wires those.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dinoforge.models.config import ModelConfig, build_backbone
from dinoforge.models.heads import DINOHead
from pretrain.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss


@dataclass
class HeadConfig:
    out_dim: int = 65536  # prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3


@dataclass
class LossConfig:
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    centering: str = "sinkhorn_knopp"  # or "centering" (EMA, DINO v1 / iBOT)
    student_temp: float = 0.1
    center_momentum: float = 0.9
    ibot_separate_head: bool = False
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)  # used when ibot_separate_head


CENTERINGS = ("sinkhorn_knopp", "centering")


def _head(in_dim: int, cfg: HeadConfig) -> DINOHead:
    return DINOHead(in_dim, cfg.out_dim, nlayers=cfg.nlayers, hidden_dim=cfg.hidden_dim,
                    bottleneck_dim=cfg.bottleneck_dim)


def _entropy(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean per-row entropy and entropy of the mean row (both near 0 or log K signal collapse)."""
    row = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    mean = probs.mean(0)
    return row, -(mean * mean.clamp_min(1e-12).log()).sum()


class SSLMetaArch(nn.Module):
    """`student` and `teacher` ModuleDicts (backbone, dino_head[, ibot_head]) and the loss modules (centers)."""

    def __init__(self, model: ModelConfig, loss: LossConfig) -> None:
        super().__init__()
        if loss.centering not in CENTERINGS:
            raise ValueError(f"loss.centering must be one of {CENTERINGS}, got {loss.centering!r}")
        self.model_cfg, self.loss_cfg = model, loss
        backbone = build_backbone(model)
        heads = {"dino_head": _head(backbone.embed_dim, loss.dino_head)}
        if loss.ibot_separate_head:
            heads["ibot_head"] = _head(backbone.embed_dim, loss.ibot_head)
        self.student = nn.ModuleDict({"backbone": backbone, **heads})
        self.teacher = nn.ModuleDict({"backbone": build_backbone(model, drop_path=False),
                                      **copy.deepcopy(heads)})
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        ibot_dim = (loss.ibot_head if loss.ibot_separate_head else loss.dino_head).out_dim
        self.dino_loss = DINOLoss(loss.dino_head.out_dim, loss.student_temp, loss.center_momentum)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim, loss.student_temp, loss.center_momentum)
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher is always in eval mode (no drop path, fixed norms)
        return self

    @property
    def ibot_head_name(self) -> str:
        return "ibot_head" if self.loss_cfg.ibot_separate_head else "dino_head"

    def _heads(self, side: nn.ModuleDict, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """DINO logits of `cls` and iBOT logits of `patches`; one head pass when the head is shared."""
        if self.loss_cfg.ibot_separate_head:
            return side["dino_head"](cls), side["ibot_head"](patches)
        logits = side["dino_head"](torch.cat([cls, patches]))
        return logits[: cls.shape[0]], logits[cls.shape[0] :]

    def _backbone(self, backbone: nn.Module, crops: list[Tensor], masks: list[Tensor | None]) -> list[dict]:
        if self.model_cfg.sequence_packing:
            return backbone(crops, masks=masks, is_training=True)
        return [backbone(c, masks=m, is_training=True) for c, m in zip(crops, masks, strict=True)]

    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float) -> dict[str, Tensor]:
        """Centered teacher distributions for the global crops' CLS tokens and the masked patch tokens."""
        out = self.teacher["backbone"](batch["global_crops"], is_training=True)
        masked = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
        cls_logits, patch_logits = self._heads(self.teacher, out["x_norm_clstoken"], masked)
        if self.loss_cfg.centering == "sinkhorn_knopp":
            cls_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_probs = self.ibot_patch_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp)
        else:
            cls_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            patch_probs = self.ibot_patch_loss.softmax_center_teacher(patch_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            self.ibot_patch_loss.update_center(patch_logits)
        return {"cls": cls_probs, "patch": patch_probs}

    def compute_losses(self, batch: dict, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Total weighted loss and its detached terms (plus teacher entropies) for one collated batch.

        Pairing: each student crop (2 globals, then locals) against every teacher global crop except the view it
        is itself (`ignore_diagonal`), which is the reference's "teacher views swapped" global term plus its local
        term, averaged over all pairs.
        """
        cfg = self.loss_cfg
        n_global = 2
        targets = self.teacher_targets(batch, teacher_temp)
        teacher_cls = list(targets["cls"].chunk(n_global))

        global_out, local_out = self._backbone(
            self.student["backbone"], [batch["global_crops"], batch["local_crops"]], [batch["masks"], None])
        student_cls = torch.cat([global_out["x_norm_clstoken"], local_out["x_norm_clstoken"]])
        masked = global_out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
        cls_logits, patch_logits = self._heads(self.student, student_cls, masked)
        n_local = local_out["x_norm_clstoken"].shape[0] // teacher_cls[0].shape[0]
        student_crops = list(cls_logits.chunk(n_global + n_local))

        terms: dict[str, Tensor] = {}
        total = cls_logits.new_zeros((), dtype=torch.float32)
        if cfg.dino_loss_weight:
            terms["dino_loss"] = self.dino_loss(student_crops, teacher_cls, ignore_diagonal=True)
            total = total + cfg.dino_loss_weight * terms["dino_loss"]
        if cfg.koleo_loss_weight:
            cls_per_crop = global_out["x_norm_clstoken"].chunk(n_global)
            terms["koleo_loss"] = sum(self.koleo_loss(c) for c in cls_per_crop)
            total = total + cfg.koleo_loss_weight * terms["koleo_loss"]
        if cfg.ibot_loss_weight and masked.shape[0]:
            terms["ibot_loss"] = self.ibot_patch_loss.forward_masked(
                patch_logits, targets["patch"], batch["masks_weight"], n_images=batch["global_crops"].shape[0])
            total = total + cfg.ibot_loss_weight * terms["ibot_loss"]
        stats = {k: v.detach() for k, v in terms.items()}
        stats["teacher_entropy"], stats["teacher_mean_entropy"] = _entropy(targets["cls"])
        return total, stats
