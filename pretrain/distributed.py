"""Distributed training components: FSDP2 sharding, activation checkpointing, compilation, teacher EMA, autocast
(the launch environment and collectives are in dinoforge.launch and dinoforge.collectives).

The model knows nothing about parallelism (torchtitan's rule): the trainer applies these functions from outside, in
the order activation checkpointing -> compile -> FSDP2. One code path serves a single CPU process (no process group,
every collective a no-op), torchrun on CPU (gloo) and GPU clusters (NCCL). Only public torch APIs are used: the
reference reaches into private FSDP1 internals (`_runtime_utils._reshard`, `module._handles`), which is why it breaks
on new PyTorch releases; here FSDPModule.reshard() does that job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from dinoforge.launch import DistributedEnv, is_distributed

logger = logging.getLogger(__name__)

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- sharding and precision -----------------------------------------------------------------------------------------


def _param_dtype(name: str) -> torch.dtype:
    if name not in PARAM_DTYPES:
        raise ValueError(f"unknown param_dtype {name!r}; choose one of {sorted(PARAM_DTYPES)}")
    return PARAM_DTYPES[name]


# Methods that callers use as entry points besides forward(); FSDP2 must gather parameters around them too.
FORWARD_METHODS = ("forward_features", "get_intermediate_layers")


def _has_own_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def _top_level_units(model: nn.Module) -> list[nn.Module]:
    """The modules that are called from outside: `model`, or, for a container without forward (a ModuleDict of
    backbone and heads), those of each child holding parameters. FSDP2 gathers a unit's own parameters only when
    the unit itself is called: a sharded container that is never called would leave its children's parameters
    sharded."""
    if _has_own_forward(model):
        return [model]
    own = [name for name, _ in model.named_parameters(recurse=False)]
    if own:
        raise ValueError(f"{type(model).__name__} has no forward() but holds parameters {own}; give it a forward or "
                         "move them into a child module")
    return [unit for child in model.children() if any(True for _ in child.parameters())
            for unit in _top_level_units(child)]


def apply_fsdp(model: nn.Module, blocks: Iterable[nn.Module], env: DistributedEnv, param_dtype: str = "fp32",
               reshard_after_forward: bool = True, force: bool = False) -> nn.Module:
    """Shard `model` with FSDP2: each of `blocks` is its own unit (one all-gather per block), then the root.

    A root without forward (e.g. ModuleDict(backbone=..., dino_head=...)) is not a unit itself: each of its
    children is, so calling `model["backbone"](x)` works. Parameters stay fp32 shards (DTensors); with
    param_dtype='bf16' they are all-gathered and computed in bf16 while gradients are reduced in fp32
    (MixedPrecisionPolicy). A single process is left unsharded unless `force` (which needs a process group); use
    `autocast` for its precision. Returns `model`, changed in place.
    """
    dtype = _param_dtype(param_dtype)
    blocks = list(blocks)
    if env.world_size == 1 and not force:
        logger.info("one process: model left unsharded")
        return model
    if not is_distributed():
        raise RuntimeError("apply_fsdp needs a process group; call init_distributed() under torchrun first")
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(blocks):
        # the root's backward all-gathers the last block again at once, so keeping it gathered saves a collective
        keep_gathered = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward and not keep_gathered)
    units = _top_level_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        for method in FORWARD_METHODS:
            if callable(getattr(unit, method, None)):
                register_fsdp_forward_method(unit, method)
    logger.info("FSDP2 over %d ranks: %d blocks + %d top-level units, params %s, reduce fp32",
                env.world_size, len(blocks), len(units), param_dtype)
    return model


# -- activation checkpointing and compilation -----------------------------------------------------------------------


class ActivationCheckpointed:
    """Mixin placed in front of a block's class: its forward is recomputed in backward instead of stored.

    Swapping the class (as FSDP2 itself does) rather than wrapping the module keeps every state-dict key unchanged
    and keeps `copy.deepcopy` (student -> teacher) correct.
    """

    def forward(self, *args, **kwargs):
        # non-reentrant: works with keyword arguments, non-tensor inputs (TokenLayout) and FSDP2's hooks
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


_checkpointed_classes: dict[type, type] = {}


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations during backward (memory for compute); idempotent."""
    count = 0
    for block in blocks:
        cls = type(block)
        if isinstance(block, ActivationCheckpointed):
            continue
        if cls not in _checkpointed_classes:
            _checkpointed_classes[cls] = type(f"Checkpointed{cls.__name__}", (ActivationCheckpointed, cls), {})
        block.__class__ = _checkpointed_classes[cls]
        count += 1
    logger.info("activation checkpointing on %d blocks", count)


def apply_compile(blocks: Iterable[nn.Module], **compile_kwargs) -> None:
    """`torch.compile` each block in place (`module.compile()`: same module, same state-dict keys).

    Per block rather than whole-model: every block shares one compiled graph, compile time stays flat in depth,
    and FSDP2's per-block hooks stay outside the graphs. `compile_kwargs` go to torch.compile (backend, mode...).
    """
    count = 0
    for block in blocks:
        block.compile(**compile_kwargs)
        count += 1
    logger.info("torch.compile on %d blocks %s", count, compile_kwargs or "")


def parallelize(model: nn.Module, env: DistributedEnv, precision: str, activation_checkpointing: bool = False,
                compile: bool = False) -> nn.Module:
    """Apply the run's parallelism to `model` (a ModuleDict holding a `backbone`, and maybe heads), in torchtitan's
    order: activation checkpointing of the blocks -> per-block compile -> FSDP2. Returns `model`, changed in place."""
    blocks = model["backbone"].blocks
    if activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if compile:
        apply_compile(blocks)
    return apply_fsdp(model, blocks, env, param_dtype=precision)


# -- teacher EMA ----------------------------------------------------------------------------------------------------


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _reshard(module: nn.Module) -> None:
    """Point every FSDP2 unit's parameters back at its shards (frees gathered copies; no communication).

    A no-grad forward leaves the root units (never resharded after forward) and the last block gathered; their
    `parameters()` are then temporary full copies, and an update written there would be lost on the next reshard.
    """
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (matched by name).

    Works on the local shards only: teacher and student sharded the same way hold the same slice of every
    parameter, so the EMA needs no communication. Buffers are not averaged (the ViT has none that train).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        only_t = sorted(teacher_params.keys() - student_params.keys())
        only_s = sorted(student_params.keys() - teacher_params.keys())
        raise ValueError(f"teacher and student parameters differ: only in teacher {only_t}, only in student {only_s}")
    _reshard(teacher)
    _reshard(student)
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    names = list(teacher_params)
    t_local = [_local(teacher_params[n]) for n in names]
    s_local = [_local(student_params[n]) for n in names]
    for name, t, s in zip(names, t_local, s_local, strict=True):
        if t.shape != s.shape:
            raise ValueError(f"parameter {name}: teacher shard {tuple(t.shape)} vs student shard {tuple(s.shape)}; "
                             "shard teacher and student with the same apply_fsdp call arguments")
    # teacher + (1 - m) * (student - teacher): one read of each list and one write, where a multiply and an add
    # read and write the teacher twice (2 x 4.4 GB a step for ViT-g). Weight 0 (m = 1) leaves the teacher as it
    # is and weight 1 (m = 0) copies the student exactly (torch's lerp computes end - (end - start) * 0 there).
    torch._foreach_lerp_(t_local, s_local, 1.0 - momentum)
