"""DINO loss on the [CLS] head outputs: cross-entropy from each teacher crop to each other student crop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.losses.centering import ema_update_center_, softmax_centered
from pretrain.losses.sinkhorn import sinkhorn_knopp


class DINOLoss(nn.Module):
    """DINO self-distillation loss with EMA or Sinkhorn-Knopp teacher centering.

    forward() returns the MEAN over (student crop, teacher crop) pairs of the batch-mean cross-entropy, i.e.
    DINOv2's sum of pair losses already divided by its number of terms. Calling it once with all student crops
    (globals first, then locals) and the teacher's global crops, with ignore_diagonal=True, gives DINOv2's
    combined global+local DINO loss. `num_pairs()` tells how many terms were averaged, for callers that want the
    sum.

    The center buffer has DINOv2's name and shape ([1, out_dim]) so training checkpoints carry over.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"DINOLoss: student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss: center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher targets by EMA centering: softmax((logits - center) / teacher_temp), fp32 [..., out_dim]."""
        return softmax_centered(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA-update the center with the batch mean of `teacher_logits` [..., out_dim], all-reduced over ranks.

        Separate from softmax_center_teacher so the caller chooses the order (DINOv2 centers with the previous
        center, then updates). Every rank must call it when torch.distributed is initialised.
        """
        ema_update_center_(self.center, teacher_logits, self.center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Teacher targets by Sinkhorn-Knopp over the global batch (see `sinkhorn_knopp`); fp32 [B, out_dim]."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=n_iterations)

    @staticmethod
    def num_pairs(n_student_crops: int, n_teacher_crops: int, ignore_diagonal: bool = False) -> int:
        """Number of (student crop, teacher crop) terms averaged by forward()."""
        skipped = min(n_student_crops, n_teacher_crops) if ignore_diagonal else 0
        return n_student_crops * n_teacher_crops - skipped

    def forward(
        self,
        student_logits: Sequence[Tensor],
        teacher_probs: Sequence[Tensor],
        ignore_diagonal: bool = False,
    ) -> Tensor:
        """Mean over pairs (i, j) of mean_b[-sum_k teacher_probs[j][b, k] * log_softmax(student_logits[i][b] / T_s)_k].

        Args:
            student_logits: one [B, out_dim] tensor per student crop.
            teacher_probs: one [B, out_dim] tensor of teacher targets per teacher crop (rows are distributions).
            ignore_diagonal: skip pairs i == j, i.e. a student crop against the teacher's view of the same crop;
                student crop i and teacher crop i must then be the same view.

        Returns an fp32 scalar, whatever the input dtype.
        """
        n_pairs = self.num_pairs(len(student_logits), len(teacher_probs), ignore_diagonal)
        if n_pairs == 0:
            raise ValueError(
                f"DINOLoss: no (student, teacher) pair to compare with {len(student_logits)} student and "
                f"{len(teacher_probs)} teacher crops (ignore_diagonal={ignore_diagonal})"
            )
        expected = None
        for name, crops in (("student_logits", student_logits), ("teacher_probs", teacher_probs)):
            for index, crop in enumerate(crops):
                if crop.ndim != 2 or crop.shape[1] != self.out_dim:
                    raise ValueError(
                        f"DINOLoss: {name}[{index}] has shape {tuple(crop.shape)}, expected [B, {self.out_dim}]"
                    )
                expected = crop.shape[0] if expected is None else expected
                if crop.shape[0] != expected:
                    raise ValueError(
                        f"DINOLoss: {name}[{index}] has batch size {crop.shape[0]}, expected {expected}: every crop "
                        "must hold one view of the same images"
                    )

        device_type = student_logits[0].device.type
        # fp32 even inside a bf16 autocast region: log_softmax over 65k prototypes needs the range.
        with torch.autocast(device_type=device_type, enabled=False):
            targets = [t.float() for t in teacher_probs]
            all_targets = torch.stack(targets).sum(dim=0)
            total = student_logits[0].new_zeros((), dtype=torch.float32)
            for i, student in enumerate(student_logits):
                log_probs = F.log_softmax(student.float() / self.student_temp, dim=-1)
                if ignore_diagonal and i < len(targets):
                    # Summed directly (not all_targets - targets[i]) to avoid cancellation error.
                    others = [t for j, t in enumerate(targets) if j != i]
                    if not others:
                        continue
                    target = torch.stack(others).sum(dim=0)
                else:
                    target = all_targets
                # sum_j CE(t_j, s_i) = CE(sum_j t_j, s_i): one product per student crop instead of one per pair.
                total = total - (target * log_probs).sum(dim=-1).mean()
        return total / n_pairs
