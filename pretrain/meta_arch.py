"""DINOv2's self-distillation setup: a student and its EMA teacher, each a ViT with DINO (+ iBOT) heads.

`SSLMetaArch.compute_losses(batch, teacher_temp)` runs the forward passes of one collated multi-crop batch and sums
the configured loss terms (DINO, iBOT, KoLeo and any in `loss.terms`, see `pretrain.losses.terms`). It knows nothing
of optimisers, schedules or process groups: the trainer wires those.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dinoforge.models.config import ModelConfig, build_backbone
from dinoforge.models.heads import DINOHead
from pretrain.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from pretrain.losses.terms import StepOutputs, build_terms, weighted_total


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
    # further terms: a built-in name or "package.module:ClassName" of a LossTerm -> its weight (0 leaves it out)
    terms: dict[str, float] = field(default_factory=dict)
    centering: str = "sinkhorn_knopp"  # or "centering" (EMA, DINO v1 / iBOT)
    student_temp: float = 0.1
    center_momentum: float = 0.9
    ibot_separate_head: bool = False
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)  # used when ibot_separate_head


CENTERINGS = ("sinkhorn_knopp", "centering")
# DINOv2's multi-crop makes two global crops (MultiCropAugmentation); collated batches say so in "n_global_crops",
# this is only for hand-built batches without that key.
DEFAULT_GLOBAL_CROPS = 2


def n_global_crops(batch: dict) -> int:
    """The number of global crops per image in a collated batch."""
    return int(batch.get("n_global_crops", DEFAULT_GLOBAL_CROPS))


def images_in_batch(batch: dict) -> int:
    """The number of images (not crops) in a collated batch."""
    return batch["global_crops"].shape[0] // n_global_crops(batch)


def _head(in_dim: int, cfg: HeadConfig) -> DINOHead:
    return DINOHead(in_dim, cfg.out_dim, nlayers=cfg.nlayers, hidden_dim=cfg.hidden_dim,
                    bottleneck_dim=cfg.bottleneck_dim)


def target_entropies(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean per-row entropy and entropy of the mean row (both near 0 or log K signal collapse)."""
    row = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    mean = probs.mean(0)
    return row, -(mean * mean.clamp_min(1e-12).log()).sum()


def head_logits(side: nn.ModuleDict, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
    """DINO logits of `cls` and iBOT logits of `patches` from a model's heads (`ibot_head` when it has its own);
    one head pass when the head is shared."""
    if "ibot_head" in side:
        return side["dino_head"](cls), side["ibot_head"](patches)
    logits = side["dino_head"](torch.cat([cls, patches]))
    return logits[: cls.shape[0]], logits[cls.shape[0] :]


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
        # a plain list: the terms hold the loss modules above (registered once, under DINOv2's state-dict names)
        self.loss_terms = build_terms(loss, self)

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher is always in eval mode (no drop path, fixed norms)
        return self

    @property
    def ibot_head_name(self) -> str:
        return "ibot_head" if self.loss_cfg.ibot_separate_head else "dino_head"

    def _backbone(self, backbone: nn.Module, crops: list[Tensor], masks: list[Tensor | None]) -> list[dict]:
        if self.model_cfg.sequence_packing:
            return backbone(crops, masks=masks, is_training=True)
        return [backbone(c, masks=m, is_training=True) for c, m in zip(crops, masks, strict=True)]

    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float) -> dict[str, Tensor]:
        """Centered teacher distributions for the global crops' CLS tokens and the masked patch tokens."""
        out = self.teacher["backbone"](batch["global_crops"], is_training=True)
        masked = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
        cls_logits, patch_logits = head_logits(self.teacher, out["x_norm_clstoken"], masked)
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

        DINO pairing: each student crop (globals, then locals) against every teacher global crop except the view
        it is itself (`ignore_diagonal`), which is the reference's "teacher views swapped" global term plus its
        local term, averaged over all pairs.
        """
        outputs = self.forward_outputs(batch, teacher_temp)
        total, stats = weighted_total(self.loss_terms, outputs, batch, teacher_temp)
        stats["teacher_entropy"], stats["teacher_mean_entropy"] = target_entropies(torch.cat(outputs.teacher_cls))
        return total, stats

    def forward_outputs(self, batch: dict, teacher_temp: float) -> StepOutputs:
        """Teacher targets and student backbone and head outputs of one batch: what the loss terms read."""
        n_global = n_global_crops(batch)
        targets = self.teacher_targets(batch, teacher_temp)
        teacher_cls = list(targets["cls"].chunk(n_global))

        global_out, local_out = self._backbone(
            self.student["backbone"], [batch["global_crops"], batch["local_crops"]], [batch["masks"], None])
        student_cls = torch.cat([global_out["x_norm_clstoken"], local_out["x_norm_clstoken"]])
        masked = global_out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
        cls_logits, patch_logits = head_logits(self.student, student_cls, masked)
        n_local = local_out["x_norm_clstoken"].shape[0] // teacher_cls[0].shape[0]
        return StepOutputs(
            n_global_crops=n_global, student_global=global_out, student_local=local_out,
            student_cls_logits=list(cls_logits.chunk(n_global + n_local)), student_patch_logits=patch_logits,
            teacher_cls=teacher_cls, teacher_patch=targets["patch"])
