"""Loss terms: the configured parts of the SSL objective, each a name, a weight and a formula.

`SSLMetaArch` runs the forward passes once and hands every term the same `StepOutputs`; a term returns its loss
(an fp32 scalar, before weighting) and optional extra statistics, or None when it does not apply to the batch
(iBOT without a masked patch). The total is the sum of weight * loss in the order of `build_terms`.

A new loss is one file and one config entry: a `LossTerm` subclass with a `name`, and
`loss.terms: {"package.module:ClassName": weight}` in the run's config (or its name here once it is built in).
The built-in terms take their weights from DINOv2's keys (`dino_loss_weight`, `koleo_loss_weight`,
`ibot_loss_weight`); a zero weight leaves the term out.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclass
class StepOutputs:
    """What the student and teacher produced for one batch, for the loss terms to read."""

    n_global_crops: int
    student_global: dict[str, Tensor]  # backbone outputs of the global crops (crop-major)
    student_local: dict[str, Tensor]  # ... and of the local crops
    student_cls_logits: list[Tensor]  # DINO head logits of the [CLS] tokens, one [B, K] per crop: globals, locals
    student_patch_logits: Tensor  # iBOT head logits of the masked patch tokens [M, K]
    teacher_cls: list[Tensor]  # teacher targets of the [CLS] tokens, one [B, K] per global crop
    teacher_patch: Tensor  # teacher targets of the masked patch tokens [M, K]


TermResult = tuple[Tensor, dict[str, Tensor]] | None


class LossTerm:
    """One weighted term of the objective. `arch` is the meta-architecture: a term that keeps state (a center)
    registers its module there in `__init__`, so that checkpoints carry it."""

    name: ClassVar[str]  # its key in the logged metrics

    def __init__(self, weight: float, arch: nn.Module) -> None:
        self.weight = weight

    def __call__(self, outputs: StepOutputs, batch: Mapping[str, Any], teacher_temp: float) -> TermResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"


class DINOTerm(LossTerm):
    """Each student crop against every teacher global crop except its own view (DINOv2's global + local terms)."""

    name = "dino_loss"

    def __init__(self, weight: float, arch: nn.Module) -> None:
        super().__init__(weight, arch)
        self.loss = arch.dino_loss

    def __call__(self, outputs: StepOutputs, batch: Mapping[str, Any], teacher_temp: float) -> TermResult:
        return self.loss(outputs.student_cls_logits, outputs.teacher_cls, ignore_diagonal=True), {}


class KoLeoTerm(LossTerm):
    """KoLeo on the backbone [CLS] of each global crop separately, summed over the crops (as DINOv2)."""

    name = "koleo_loss"

    def __init__(self, weight: float, arch: nn.Module) -> None:
        super().__init__(weight, arch)
        self.loss = arch.koleo_loss

    def __call__(self, outputs: StepOutputs, batch: Mapping[str, Any], teacher_temp: float) -> TermResult:
        crops = outputs.student_global["x_norm_clstoken"].chunk(outputs.n_global_crops)
        return sum(self.loss(c) for c in crops), {}


class IBOTTerm(LossTerm):
    """iBOT on the masked patch tokens of the global crops; absent from a batch without a masked patch."""

    name = "ibot_loss"

    def __init__(self, weight: float, arch: nn.Module) -> None:
        super().__init__(weight, arch)
        self.loss = arch.ibot_patch_loss

    def __call__(self, outputs: StepOutputs, batch: Mapping[str, Any], teacher_temp: float) -> TermResult:
        if not outputs.student_patch_logits.shape[0]:
            return None
        loss = self.loss.forward_masked(outputs.student_patch_logits, outputs.teacher_patch, batch["masks_weight"],
                                        n_images=batch["global_crops"].shape[0])
        return loss, {}


# The built-in terms and the LossConfig field holding each weight, in the order their weighted losses are summed
# (the order of DINOv2's meta-architecture: the total is bit-identical to it).
BUILTIN_TERMS: dict[str, tuple[type[LossTerm], str]] = {
    DINOTerm.name: (DINOTerm, "dino_loss_weight"),
    KoLeoTerm.name: (KoLeoTerm, "koleo_loss_weight"),
    IBOTTerm.name: (IBOTTerm, "ibot_loss_weight"),
}


def resolve_term(spec: str) -> type[LossTerm]:
    """A built-in term's name (`dino_loss`, `koleo_loss`, `ibot_loss`) or a `package.module:ClassName` path."""
    if spec in BUILTIN_TERMS:
        return BUILTIN_TERMS[spec][0]
    module_name, _, class_name = spec.partition(":")
    if not class_name:
        raise ValueError(f"unknown loss term {spec!r}: use one of {', '.join(BUILTIN_TERMS)} or a "
                         f"'package.module:ClassName' path to a LossTerm subclass")
    term = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(term, type) and issubclass(term, LossTerm)):
        raise ValueError(f"loss term {spec!r} is not a LossTerm subclass")
    return term


def weighted_total(terms: list[LossTerm], outputs: StepOutputs, batch: Mapping[str, Any],
                   teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The sum of weight * loss over `terms` (fp32, in their order) and every term's detached value and extras."""
    values: dict[str, Tensor] = {}
    total = outputs.student_patch_logits.new_zeros((), dtype=torch.float32)
    for term in terms:
        result = term(outputs, batch, teacher_temp)
        if result is None:
            continue
        loss, extra = result
        values[term.name] = loss
        total = total + term.weight * loss
        values.update(extra)
    return total, {k: v.detach() for k, v in values.items()}


def build_terms(loss_cfg: Any, arch: nn.Module) -> list[LossTerm]:
    """The terms of `loss_cfg` with a non-zero weight: the built-ins (their `*_loss_weight` keys), then
    `loss_cfg.terms` in its order. A built-in named in `terms` too is an error (two weights for one term)."""
    weights = {name: float(getattr(loss_cfg, key)) for name, (_, key) in BUILTIN_TERMS.items()}
    for spec, weight in dict(loss_cfg.terms).items():
        if spec in BUILTIN_TERMS:
            raise ValueError(f"loss.terms names the built-in term {spec!r}; set loss.{BUILTIN_TERMS[spec][1]} instead")
        weights[spec] = float(weight)
    terms = [resolve_term(spec)(weight, arch) for spec, weight in weights.items() if weight]
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two loss terms log under the same name: {', '.join(duplicates)}")
    return terms
