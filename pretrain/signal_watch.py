"""Watching the teacher's targets for the two shapes of a run that trains without signal.

- Uniform targets: every teacher row near 1/K (entropy within 1% of log K). The DINO loss then sits at log K and
  teaches nothing (the reference's most reported problem, dinov2 issue 143). Sinkhorn-Knopp makes the targets exactly
  uniform when all images give the same CLS token, e.g. when a LayerScale init of 1e-5 mutes every block.
- Collapse: every image gets the same few prototypes, so the entropy of the batch-mean target falls far below what
  the batch could spread over (log of min(K, teacher rows)).
Both are judged after the learning-rate warm-up, warned about once each with the likely causes and the config keys
to change, and recorded in metrics.jsonl.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)

UNIFORM_FRACTION = 0.99  # row entropy at or above this fraction of log K: uniform targets
COLLAPSE_FRACTION = 0.3  # batch-mean entropy below this fraction of log(min(K, rows)): collapse

ADVICE = {
    "uniform_targets": (
        "teacher targets are uniform: row entropy {value:.3f} is {fraction:.1%} of log K = {log_k:.3f} at step "
        "{step}, so the DINO loss carries no signal. Likely causes: a LayerScale init that mutes every block "
        "(model.layerscale; 1e-5 gives every image the same CLS token: use 0.1), too many prototypes per teacher row "
        "for Sinkhorn-Knopp (loss.dino_head.out_dim against 2 x data.batch_size_per_rank x world size), a teacher "
        "temperature too high for the head's initial logits (optim.warmup_teacher_temp, optim.teacher_temp), or a "
        "teacher that follows too slowly for the run's length (optim.momentum_teacher)."
    ),
    "collapse": (
        "teacher targets collapsed: the batch-mean target's entropy {value:.3f} is {fraction:.1%} of log(min(K, "
        "rows)) = {log_k:.3f} at step {step}, so every image gets the same prototypes. Likely causes: centering "
        "without Sinkhorn-Knopp (loss.centering: use sinkhorn_knopp), a teacher temperature too low "
        "(optim.teacher_temp), a learning rate too high (optim.base_lr), or no KoLeo (loss.koleo_loss_weight)."
    ),
}


@dataclass(frozen=True)
class SignalProblem:
    shape: str  # "uniform_targets" or "collapse"
    message: str


class SignalWatch:
    """Judges the logged teacher entropies of a run with `prototypes` DINO prototypes and `rows` teacher rows a step."""

    def __init__(self, prototypes: int, rows: int, after_step: int) -> None:
        self.log_k = math.log(prototypes)
        self.log_spread = math.log(min(prototypes, rows))
        self.after_step = after_step
        self.warned: set[str] = set()

    def check(self, step: int, teacher_entropy: float, teacher_mean_entropy: float) -> list[SignalProblem]:
        """The problems first seen at `step` (each shape is reported once per run), warned about in the log."""
        if step < self.after_step:
            return []
        found = []
        if teacher_entropy >= UNIFORM_FRACTION * self.log_k:
            found.append(("uniform_targets", teacher_entropy, teacher_entropy / self.log_k, self.log_k))
        if teacher_mean_entropy < COLLAPSE_FRACTION * self.log_spread:
            found.append(("collapse", teacher_mean_entropy, teacher_mean_entropy / self.log_spread, self.log_spread))
        problems = []
        for shape, value, fraction, log_k in found:
            if shape not in self.warned:
                self.warned.add(shape)
                message = ADVICE[shape].format(value=value, fraction=fraction, log_k=log_k, step=step)
                logger.warning(message)
                problems.append(SignalProblem(shape, message))
        return problems
