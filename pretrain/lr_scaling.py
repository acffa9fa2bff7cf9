"""The peak learning rate of a batch size from the rate tuned for 1024 images (DINOv2's `apply_scaling_rules`)."""

from __future__ import annotations

import math

SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_1024", "none")


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """Peak lr for `global_batch` images per optimizer step (all ranks and accumulated micro-batches) from the
    lr tuned for 1024: times sqrt(batch / 1024) (DINOv2's rule, suited to Adam), batch / 1024, or unchanged."""
    if global_batch <= 0:
        raise ValueError(f"global_batch={global_batch} must be a positive number of images per optimizer step")
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "linear_wrt_1024":
        return base_lr * global_batch / 1024
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; choose one of {', '.join(SCALING_RULES)}")
