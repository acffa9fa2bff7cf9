"""Distributed runtime: process-group setup, FSDP2 sharding, activation checkpointing, compilation, teacher EMA.

The model knows nothing about parallelism (torchtitan's rule): the trainer applies these functions from outside, in
the order activation checkpointing -> compile -> FSDP2. One code path serves a single CPU process (no process group,
every collective a no-op), torchrun on CPU (gloo) and GPU clusters (NCCL). Only public torch APIs are used: the
reference reaches into private FSDP1 internals (`_runtime_utils._reshard`, `module._handles`), which is why it breaks
on new PyTorch releases; here FSDPModule.reshard() does that job.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = ("auto", "nccl", "gloo")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job. `backend` is None for a single process without a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that logs, writes metrics and renames checkpoints."""
        return self.rank == 0


_single_process_env: DistributedEnv | None = None


def is_distributed() -> bool:
    """True when a default process group exists (collectives must then be called by every rank)."""
    return dist.is_available() and dist.is_initialized()


def _int_variable(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"environment variable {name} is missing; torchrun sets all of {TORCHRUN_VARIABLES} "
                           "(under Slurm, launch through `python -m slurm` which translates them)")
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend 'nccl' needs CUDA, and no CUDA device is visible; use backend='gloo' on CPU")
    return backend


def _device_for(backend: str, local_rank: int) -> torch.device:
    """NCCL ranks own cuda:LOCAL_RANK; gloo ranks compute on the CPU."""
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                               "visible; start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _env_of_existing_group() -> DistributedEnv:
    backend = str(dist.get_backend())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistributedEnv(rank, world_size, local_rank, device, backend)


def init_distributed(backend: str = "auto") -> DistributedEnv:
    """Join the job described by torchrun's variables, or run as a single process when they are absent.

    NCCL on CUDA (one device per LOCAL_RANK), gloo on CPU. Idempotent: a second call, or a call after someone else
    created the default process group, describes the existing group.
    """
    global _single_process_env
    if is_distributed():
        return _env_of_existing_group()
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        if _single_process_env is None:
            # the backend only picks the device here: no process group is created for one process
            device = _device_for(_resolve_backend(backend), 0)
            _single_process_env = DistributedEnv(device=device)
            logger.info("single process on %s (no torchrun variables)", device)
        return _single_process_env
    rank, world_size, local_rank = (_int_variable(n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(f"environment variable {name} is missing; torchrun sets all of {TORCHRUN_VARIABLES}")
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size}); check the launcher's variables")
    resolved = _resolve_backend(backend)
    device = _device_for(resolved, local_rank)
    # device_id binds NCCL's communicator to this rank's GPU up front (and is meaningless for gloo)
    dist.init_process_group(resolved, rank=rank, world_size=world_size,
                            device_id=device if resolved == "nccl" else None)
    logger.info("rank %d/%d (local %d) on %s with %s", rank, world_size, local_rank, device, resolved)
    return DistributedEnv(rank, world_size, local_rank, device, resolved)


def destroy_distributed() -> None:
    """Leave the process group (if any); safe to call when none exists."""
    global _single_process_env
    _single_process_env = None
    if is_distributed():
        dist.destroy_process_group()


# -- collectives ----------------------------------------------------------------------------------------------------


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` in place over all processes (no-op for a single process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Average a floating-point `tensor` in place over all processes (no-op for a single process); returns it."""
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got {tensor.dtype}; use all_reduce_sum "
                        "for counts")
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def barrier() -> None:
    """Wait for every process (no-op for a single process)."""
    if is_distributed():
        dist.barrier()


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


def autocast(device: torch.device, param_dtype: str = "fp32") -> contextlib.AbstractContextManager:
    """Compute precision for an unsharded model: bf16 autocast when asked, nothing for fp32.

    Sharded models get bf16 from their MixedPrecisionPolicy; losses are computed in fp32 either way (they upcast).
    """
    dtype = _param_dtype(param_dtype)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    torch._foreach_mul_(t_local, momentum)
    torch._foreach_add_(t_local, s_local, alpha=1.0 - momentum)
