"""iBOT loss on masked patch tokens: the student predicts the teacher's assignment of each patch it could not see."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.losses.centering import ema_update_center_, softmax_centered
from pretrain.losses.sinkhorn import sinkhorn_knopp


def masks_weight_from_masks(masks: Tensor) -> Tensor:
    """Per-masked-token weights 1 / (number of masked patches in its image), in the order of `masks[masks]`.

    masks: [n_images, n_patches] bool. Returns [M] fp32 with M = masks.sum(), aligned with tokens gathered by
    boolean indexing (image-major, patch order), so every image with a mask weighs 1 in total.
    """
    if masks.dtype != torch.bool or masks.ndim != 2:
        raise ValueError(f"masks must be a [n_images, n_patches] bool tensor, got {masks.dtype} {tuple(masks.shape)}")
    per_image = 1.0 / masks.sum(dim=1).clamp(min=1).float()
    return per_image.unsqueeze(1).expand(masks.shape)[masks]


class iBOTPatchLoss(nn.Module):  # noqa: N801 - the paper's and DINOv2's name, part of the public API
    """iBOT masked-patch loss with EMA or Sinkhorn-Knopp centering of the teacher's masked patch tokens.

    Normalisation (as DINOv2): each masked token's cross-entropy is weighted by 1 / (masked tokens in its image),
    summed, and divided by `n_images`, the number of images in the global-crop batch INCLUDING those without a
    mask. Each masked image thus contributes its mean token loss, and unmasked images contribute zero, so the loss
    scale follows the mask sampling probability exactly as in DINOv2 (its loss weights carry over).

    The center buffer has DINOv2's name and shape ([1, 1, patch_out_dim]) so training checkpoints carry over.
    """

    center: Tensor

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"iBOTPatchLoss: student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"iBOTPatchLoss: center_momentum must be in [0, 1], got {center_momentum}")
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_logits: Tensor, teacher_temp: float) -> Tensor:
        """EMA-centered teacher targets for masked patch tokens [..., patch_out_dim] -> fp32, same shape."""
        return softmax_centered(teacher_patch_logits, self.center, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: Tensor) -> None:
        """EMA-update the center with the mean over the masked tokens [M, patch_out_dim] of all ranks.

        The mean is per prototype over tokens; [M, K] is taken as is (DINOv2's code needs an extra leading axis).
        """
        ema_update_center_(self.center, teacher_patch_logits, self.center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_patch_logits: Tensor,
        teacher_temp: float,
        n_masked_patches: int | Tensor | None = None,
        n_iterations: int = 3,
    ) -> Tensor:
        """Sinkhorn-Knopp targets over the masked tokens of all ranks: [M, K] -> fp32 [M, K].

        teacher_patch_logits must hold only valid (masked) tokens, no padding. n_masked_patches is DINOv2's GLOBAL
        count, accepted for its signature; the targets do not depend on it (see `sinkhorn_knopp`'s n_samples).
        """
        return sinkhorn_knopp(teacher_patch_logits, teacher_temp, n_iterations=n_iterations, n_samples=n_masked_patches)

    def forward_masked(
        self,
        student_patch_logits: Tensor,
        teacher_patch_probs: Tensor,
        masks_weight: Tensor,
        n_images: int,
    ) -> Tensor:
        """-sum_m masks_weight[m] * sum_k teacher[m, k] * log_softmax(student[m] / T_s)_k / n_images (fp32 scalar).

        Args:
            student_patch_logits: [M, K] student head outputs at the masked positions.
            teacher_patch_probs: [M, K] teacher targets for the same tokens (rows are distributions).
            masks_weight: [M] weight of each token, 1 / (masked tokens in its image); see masks_weight_from_masks.
            n_images: images in the global-crop batch of this process, masked or not (see the class docstring).
        """
        if student_patch_logits.ndim != 2 or student_patch_logits.shape[1] != self.patch_out_dim:
            raise ValueError(
                f"iBOTPatchLoss: student_patch_logits has shape {tuple(student_patch_logits.shape)}, "
                f"expected [M, {self.patch_out_dim}]"
            )
        if teacher_patch_probs.shape != student_patch_logits.shape:
            raise ValueError(
                f"iBOTPatchLoss: teacher_patch_probs has shape {tuple(teacher_patch_probs.shape)}, expected the "
                f"student's {tuple(student_patch_logits.shape)}"
            )
        if masks_weight.shape != student_patch_logits.shape[:1]:
            raise ValueError(
                f"iBOTPatchLoss: masks_weight has shape {tuple(masks_weight.shape)}, expected "
                f"[{student_patch_logits.shape[0]}] (one weight per masked token)"
            )
        if n_images <= 0:
            raise ValueError(f"iBOTPatchLoss: n_images must be positive, got {n_images}")

        with torch.autocast(device_type=student_patch_logits.device.type, enabled=False):
            log_probs = F.log_softmax(student_patch_logits.float() / self.student_temp, dim=-1)
            token_loss = -(teacher_patch_probs.float() * log_probs).sum(dim=-1)
            return (token_loss * masks_weight.float()).sum() / n_images
