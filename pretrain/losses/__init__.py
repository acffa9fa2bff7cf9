"""Self-distillation losses: DINO ([CLS]), iBOT (masked patches), KoLeo (uniformity), Sinkhorn-Knopp targets.

Every loss and every teacher target is computed in fp32, whatever the input dtype.
"""

from pretrain.losses.dino import DINOLoss
from pretrain.losses.ibot import iBOTPatchLoss, masks_weight_from_masks
from pretrain.losses.koleo import KoLeoLoss
from pretrain.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "masks_weight_from_masks", "sinkhorn_knopp"]
