"""AdamW for SSL pretraining: parameter groups with layer-wise lr decay, gradient clipping, gradient accumulation.

Parameter groups follow DINOv2 (`dinov2/utils/param_groups.py`), with the differences listed in `param_groups`.
Each group carries multipliers, not rates: `TrainingSchedules.apply_to_optimizer` (schedules.py) sets every group's
`lr` and `weight_decay` from the step's schedule values before each optimizer step.

Gradient accumulation (k = `OptimConfig.accumulation_steps`): the trainer takes k equal-size loader batches
(micro-batches) per optimizer step, back-propagates `loss * accumulation_scale(k)` for each, then clips, applies the
schedules, steps the optimizer and updates the teacher once. For losses that are means over samples this equals one
pass over the whole batch (tested). Batch-coupled terms are not: Sinkhorn-Knopp, centering and KoLeo see one
micro-batch at a time, as with a smaller per-GPU batch. Schedule steps count optimizer steps, never micro-batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinoforge.config import ConfigError
from dinoforge.models.layer_scale import LayerScale
from pretrain.lr_scaling import SCALING_RULES

try:  # torch builds without distributed support have no DTensor; then no gradient can be one
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None

logger = logging.getLogger(__name__)

# Backbone parameters before the first block: layer 0 of the layer-wise lr decay.
EMBEDDING_NAMES = frozenset({"patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens"})
TOKEN_NAMES = frozenset({"pos_embed", "cls_token", "mask_token", "register_tokens"})
# Path components inserted by wrappers (activation checkpointing, torch.compile, FSDP1) that are not model names.
WRAPPER_NAMES = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


@dataclass
class OptimConfig:
    """Optimiser, schedules and teacher hyper-parameters; all durations in optimizer steps.

    Defaults are DINOv2's ViT-L/16 ImageNet recipe (`ssl_default_config.yaml`), whose epochs are 1250 steps.
    """

    base_lr: float = 0.004  # peak lr for 1024 images per optimizer step, before `scaling_rule`
    scaling_rule: str = "sqrt_wrt_1024"  # sqrt_wrt_1024 | linear_wrt_1024 | none (DINOv2: sqrt_wrt_1024)
    min_lr: float = 1.0e-6  # lr at the end of the cosine decay
    warmup_steps: int = 12_500  # linear lr warm-up from 0 (DINOv2: 10 epochs)
    weight_decay: float = 0.04  # cosine schedule from weight_decay to weight_decay_end
    weight_decay_end: float = 0.4
    decay_tokens: bool = True  # weight decay on cls/pos/mask/register tokens (DINOv2: yes; timm/MAE: no)
    layerwise_decay: float = 0.9  # lr of layer l gets layerwise_decay ** (depth + 1 - l)
    patch_embed_lr_mult: float = 0.2  # extra lr factor of the patch embedding (DINOv2: 0.2)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    clip_grad: float = 3.0  # max global gradient norm; 0 disables clipping
    clip_per_module: bool = False  # clip backbone and each head separately, as DINOv2 does (its only mode)
    freeze_last_layer_steps: int = 1250  # heads' last layer gets lr 0 for these first steps (DINOv2: 1 epoch)
    momentum_teacher: float = 0.992  # teacher EMA momentum, cosine to final_momentum_teacher
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07  # teacher softmax temperature after its warm-up
    warmup_teacher_temp: float = 0.04  # ... and at step 0, rising linearly over warmup_teacher_temp_steps
    warmup_teacher_temp_steps: int = 37_500  # DINOv2: 30 epochs
    accumulation_steps: int = 1  # micro-batches per optimizer step

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # OmegaConf hands tuples over as lists
        problems = [
            f"scaling_rule={self.scaling_rule!r} is not one of {', '.join(SCALING_RULES)}"
            if self.scaling_rule not in SCALING_RULES else "",
            _require(self.base_lr > 0, "base_lr", self.base_lr, "> 0"),
            _require(self.min_lr >= 0, "min_lr", self.min_lr, ">= 0"),
            _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0"),
            _require(self.weight_decay_end >= 0, "weight_decay_end", self.weight_decay_end, ">= 0"),
            _require(0 < self.layerwise_decay <= 1, "layerwise_decay", self.layerwise_decay, "in (0, 1]"),
            _require(self.patch_embed_lr_mult >= 0, "patch_embed_lr_mult", self.patch_embed_lr_mult, ">= 0"),
            _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
                     "two values in [0, 1)"),
            _require(self.eps > 0, "eps", self.eps, "> 0"),
            _require(self.clip_grad >= 0, "clip_grad", self.clip_grad, ">= 0 (0 disables clipping)"),
            _require(0 <= self.momentum_teacher <= 1, "momentum_teacher", self.momentum_teacher, "in [0, 1]"),
            _require(0 <= self.final_momentum_teacher <= 1, "final_momentum_teacher", self.final_momentum_teacher,
                     "in [0, 1]"),
            _require(self.teacher_temp > 0, "teacher_temp", self.teacher_temp, "> 0"),
            _require(self.warmup_teacher_temp > 0, "warmup_teacher_temp", self.warmup_teacher_temp, "> 0"),
            _require(self.accumulation_steps >= 1, "accumulation_steps", self.accumulation_steps, ">= 1"),
        ]
        for key in ("warmup_steps", "freeze_last_layer_steps", "warmup_teacher_temp_steps"):
            problems.append(_require(getattr(self, key) >= 0, key, getattr(self, key), ">= 0"))
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError("bad optim config: " + "; ".join(problems))


def _require(ok: bool, key: str, value: object, rule: str) -> str:
    return "" if ok else f"{key}={value!r} must be {rule}"


# -- parameter groups -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRule:
    """How the optimizer treats one parameter."""

    layer_id: int
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


def clean_name(name: str) -> str:
    """A parameter name without the components that wrappers insert (`_orig_mod`, `_checkpoint_wrapped_module`)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def layer_id(name: str, depth: int) -> int:
    """Layer of a parameter for lr decay: 0 for the patch embedding and tokens, i + 1 for block i (found as a
    `blocks.<i>` path component anywhere in `name`), depth + 1 for everything else (final norm, heads)."""
    parts = clean_name(name).split(".")
    if EMBEDDING_NAMES.intersection(parts):
        return 0
    block = _block_index(parts)
    if block is None:
        return depth + 1
    if block >= depth:
        raise ValueError(f"parameter {name!r} is in block {block} but depth={depth}; pass the backbone's number of "
                         f"blocks (model.n_blocks) as depth")
    return block + 1


def _block_index(parts: list[str]) -> int | None:
    """i of the first `blocks.<i>` in a split parameter name, None outside the blocks."""
    for here, after in zip(parts[:-1], parts[1:], strict=True):
        if here == "blocks" and after.isdigit():
            return int(after)
    return None


def param_rule(name: str, param: Tensor, owner: nn.Module, depth: int, layerwise_decay: float,
               patch_embed_lr_mult: float, decay_tokens: bool = True) -> ParamRule:
    """Layer id, lr and weight-decay multipliers and last-layer flag of parameter `name` held by module `owner`."""
    parts = clean_name(name).split(".")
    layer = layer_id(name, depth)
    lr_mult = layerwise_decay ** (depth + 1 - layer)
    if "patch_embed" in parts:
        lr_mult *= patch_embed_lr_mult
    # DINOv2 matches "bias" / "norm" / "gamma" in the name; module types and ndim say the same without relying on
    # naming, and also exempt BatchNorm weights (named `mlp.1.weight` in a head with use_bn), which DINOv2 decays.
    no_decay = (param.ndim <= 1 or parts[-1] == "bias" or isinstance(owner, (*NORM_TYPES, LayerScale))
                or (not decay_tokens and bool(TOKEN_NAMES.intersection(parts))))
    return ParamRule(layer, lr_mult, 0.0 if no_decay else 1.0, "last_layer" in parts)


def param_groups(module: nn.Module, depth: int | None = None, layerwise_decay: float = 1.0,
                 patch_embed_lr_mult: float = 1.0, decay_tokens: bool = True) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of `module`, merged by identical treatment.

    `module` is a backbone, or any wrapper around backbone and heads (e.g. `student.backbone`,
    `student.dino_head`, `student.ibot_head`); blocks are found by their `blocks.<i>` name component, so FSDP2-
    sharded (DTensor) modules and checkpoint/compile wrappers work unchanged. `depth` defaults to the number of
    blocks found. Parameter of layer l (see `layer_id`) gets lr multiplier layerwise_decay ** (depth + 1 - l),
    times `patch_embed_lr_mult` in the patch embedding; biases, norm weights, LayerScale gammas and any other 1-D
    parameter get weight-decay multiplier 0; `last_layer` parameters of the heads are flagged `is_last_layer` (their
    lr is 0 while frozen, see schedules.py). Each group: `params`, `names`, `lr_multiplier`, `wd_multiplier`,
    `is_last_layer`, in the order of `named_parameters()` (the same on every rank, as checkpoints need).

    Differences from DINOv2, on purpose: register tokens sit in layer 0 with the other tokens (DINOv2 leaves them
    at the top layer, lr multiplier 1); every 1-D parameter and every norm weight is exempt from weight decay.
    Tokens are decayed as in DINOv2 unless `decay_tokens=False`. Frozen parameters are left out (and logged).
    """
    owners = _owner_modules(module)
    named = list(module.named_parameters())
    depth = _infer_depth(named) if depth is None else depth
    groups: dict[tuple[float, float, bool], dict] = {}
    frozen = []
    for name, param in named:
        if not param.requires_grad:
            frozen.append(name)
            continue
        rule = param_rule(name, param, owners[id(param)], depth, layerwise_decay, patch_embed_lr_mult, decay_tokens)
        logger.debug("%s: layer %d, lr x%.4g, wd x%g%s", name, rule.layer_id, rule.lr_multiplier,
                     rule.wd_multiplier, ", last layer" if rule.is_last_layer else "")
        key = (rule.lr_multiplier, rule.wd_multiplier, rule.is_last_layer)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_multiplier": rule.lr_multiplier,
                                        "wd_multiplier": rule.wd_multiplier, "is_last_layer": rule.is_last_layer})
        group["params"].append(param)
        group["names"].append(clean_name(name))
    if frozen:
        logger.info("%d frozen parameters get no optimizer state: %s", len(frozen), ", ".join(frozen[:8])
                    + (", ..." if len(frozen) > 8 else ""))
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameter to optimise")
    result = list(groups.values())
    for i, group in enumerate(result):
        logger.info("param group %d: %d tensors, %d values, lr x%.4g, wd x%g%s", i, len(group["params"]),
                    sum(p.numel() for p in group["params"]), group["lr_multiplier"], group["wd_multiplier"],
                    ", last layer" if group["is_last_layer"] else "")
    return result


def _owner_modules(module: nn.Module) -> dict[int, nn.Module]:
    """id(parameter) -> the module that holds it directly."""
    owners = {}
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            owners.setdefault(id(param), sub)
    return owners


def _infer_depth(named: list[tuple[str, Tensor]]) -> int:
    blocks = [_block_index(clean_name(name).split(".")) for name, _ in named]
    return max((b for b in blocks if b is not None), default=-1) + 1


def build_optimizer(module: nn.Module, cfg: OptimConfig, depth: int | None = None,
                    implementation: str = "auto") -> torch.optim.AdamW:
    """AdamW over `param_groups(module, ...)` from `cfg`; lr and weight decay are set per step by the schedules.

    `implementation`: "auto" uses the fused kernel when every parameter is on CUDA and the multi-tensor (foreach)
    one elsewhere; "fused", "foreach" or "for_loop" force one.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    groups = param_groups(module, depth, cfg.layerwise_decay, cfg.patch_embed_lr_mult, cfg.decay_tokens)
    if implementation == "auto":
        devices = {p.device.type for g in groups for p in g["params"]}
        implementation = "fused" if devices == {"cuda"} else "foreach"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0, **kernel)


# -- gradient clipping ------------------------------------------------------------------------------------------


def _full(norm: Tensor) -> Tensor:
    """A plain tensor from a (possibly DTensor) norm: the reduction over shards happens here."""
    return norm.full_tensor() if DTensor is not None and isinstance(norm, DTensor) else norm


def _grads(params: Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    with_grad = [p for p in params if p.grad is not None]
    return with_grad, [p.grad for p in with_grad]


def _clip_unit(params: list[Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool) -> Tensor:
    """Clip one set of parameters by their joint gradient norm; returns that norm (before clipping)."""
    params, grads = _grads(params)
    if not grads:
        return torch.zeros(())
    # On DTensor grads (FSDP2) the norm is a partial sum over shards until `full_tensor` reduces it; clipping with
    # the DTensor norm lets torch do that reduction once, on every rank alike.
    norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return _full(norm)


def clip_grad_norm_per_module(module: nn.Module, max_norm: float, norm_type: float = 2.0,
                              error_if_nonfinite: bool = False) -> dict[str, Tensor]:
    """Clip the gradients of each direct child of `module` by its own norm; returns the norms before clipping.

    DINOv2 clips `student.backbone`, `student.dino_head` and `student.ibot_head` this way: pass the module whose
    children are those (e.g. the `student` ModuleDict). Parameters held by `module` itself form a unit named ''.
    `max_norm` <= 0 measures without clipping.
    """
    units = {name: list(child.parameters()) for name, child in module.named_children()}
    own = list(module.parameters(recurse=False))
    if own:
        units[""] = own
    return {name: _clip_unit(params, max_norm, norm_type, error_if_nonfinite) for name, params in units.items()
            if any(p.grad is not None for p in params)}


def clip_grad_norm(module: nn.Module, max_norm: float, per_module: bool = False, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False) -> Tensor:
    """Clip gradients to `max_norm` by their global norm (or, with `per_module`, each direct child of `module`
    separately, see `clip_grad_norm_per_module`); returns the global norm before clipping, for logging.

    Works on FSDP2-sharded modules (DTensor gradients): the norm is reduced across ranks. `max_norm` <= 0 only
    measures. With a non-finite norm the gradients become non-finite too; the trainer checks the returned norm.
    """
    if not per_module:
        return _clip_unit(list(module.parameters()), max_norm, norm_type, error_if_nonfinite)
    norms = list(clip_grad_norm_per_module(module, max_norm, norm_type, error_if_nonfinite).values())
    if not norms:
        return torch.zeros(())
    if math.isinf(norm_type):
        return torch.stack([n.to(norms[0].device) for n in norms]).max()
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)


# -- gradient accumulation --------------------------------------------------------------------------------------


def accumulation_scale(accumulation_steps: int) -> float:
    """Factor for each micro-batch loss so that k accumulated backward passes sum to the gradient of the mean loss
    over the k equal micro-batches (see the module docstring)."""
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps={accumulation_steps} must be >= 1")
    return 1.0 / accumulation_steps

