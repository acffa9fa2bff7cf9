"""Feature distillation: a student's [CLS] and patch tokens against a frozen teacher's, for teachers without heads.

Each of the two token kinds costs `cosine_weight * (1 - cos(s, t)) + smooth_l1_weight * smooth_l1(s, t)`, averaged
over tokens (and, for smooth L1, over channels). The student's tokens are first mapped to the teacher's width by a
learned projection (identity when the widths agree); the teacher's patch grid is resampled to the student's when the
patch size or the resolution differ, so that token i of both describes the same region of the crop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resample_patch_grid(tokens: Tensor, side: int) -> Tensor:
    """[B, N, D] tokens on a square grid -> [B, side*side, D] on a side x side grid (bilinear; antialiased when
    shrinking, so every teacher token under a student token counts)."""
    batch, n, dim = tokens.shape
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"patch tokens [{batch}, {n}, {dim}] are not a square grid")
    if old == side:
        return tokens
    grid = tokens.transpose(1, 2).reshape(batch, dim, old, old).float()
    grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False, antialias=side < old)
    return grid.flatten(2).transpose(1, 2).to(tokens.dtype)


class FeatureProjection(nn.Module):
    """Student width -> teacher width for the [CLS] (`cls`) and patch (`patch`) tokens; identity when equal."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        same = student_dim == teacher_dim
        self.cls = nn.Identity() if same else nn.Linear(student_dim, teacher_dim)
        self.patch = nn.Identity() if same else nn.Linear(student_dim, teacher_dim)

    def forward(self, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls(cls), self.patch(patches)


def token_distance(student: Tensor, teacher: Tensor, cosine_weight: float, smooth_l1_weight: float) -> Tensor:
    """Weighted (1 - cosine) + smooth L1 between [..., D] token sets, averaged over tokens; fp32 scalar."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        student, teacher = student.float(), teacher.float()
        loss = student.new_zeros(())
        if cosine_weight:
            loss = loss + cosine_weight * (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        if smooth_l1_weight:
            loss = loss + smooth_l1_weight * F.smooth_l1_loss(student, teacher)
        return loss
