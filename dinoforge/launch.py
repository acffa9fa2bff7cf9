"""Where this process sits in its job, from the launcher's environment, and joining the job's process group.

One precedence, for every stage:
1. torchrun (or any launcher that sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`): used as given, also inside a Slurm
   allocation (torchrun's variables describe its own processes, Slurm's the task that started torchrun);
2. Slurm (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` or `SLURM_NTASKS`, `SLURM_LOCALID`): each task of `srun -n N` is
   one rank of one job. The rendezvous is `MASTER_ADDR` / `MASTER_PORT` when exported, else the first host of
   `SLURM_JOB_NODELIST` (or `SLURM_LAUNCH_NODE_IPADDR`) and a port derived from the job id, so that every task finds
   the same address;
3. a single process: no process group at all, every collective a no-op.
NCCL on GPU (one device per local rank), gloo on CPU.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dinoforge.config import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000  # ports derived from the job id land in [20000, 40000)


class LaunchError(RuntimeError):
    """The launcher's environment variables are missing, malformed or inconsistent."""


@dataclass(frozen=True)
class LaunchPlace:
    """Where the launcher put this process, and how its ranks meet (None for a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "single process"


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise LaunchError(f"environment variable {name} is missing")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[03-05,07],cpu1` -> `gpu03`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise LaunchError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _slurm_rendezvous(env: Mapping[str, str]) -> tuple[str, int]:
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = first_host(nodelist) if nodelist else env.get("SLURM_LAUNCH_NODE_IPADDR")
    if not addr:
        raise LaunchError("a Slurm job of several tasks needs MASTER_ADDR, SLURM_JOB_NODELIST or "
                          "SLURM_LAUNCH_NODE_IPADDR to find its first node; run it through srun or export MASTER_ADDR")
    port = env.get("MASTER_PORT")
    job = env.get("SLURM_JOB_ID", "0")
    return addr, int(port) if port else SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN


def launch_place(env: Mapping[str, str] = os.environ) -> LaunchPlace:
    """This process's place, by the module's precedence (torchrun, then Slurm, then a single process)."""
    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world, local = (_int(env, n) for n in TORCHRUN_VARIABLES)
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
        if missing and world > 1:
            raise LaunchError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not; torchrun sets all of "
                              f"{TORCHRUN_VARIABLES + ('MASTER_ADDR', 'MASTER_PORT')}")
        place = LaunchPlace(rank, world, local, env.get("MASTER_ADDR"),
                            int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None, "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # an srun step's own task count: a step may use fewer tasks than its allocation (SLURM_NTASKS)
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        addr, port = _slurm_rendezvous(env) if world > 1 else (None, None)
        place = LaunchPlace(rank, world, local, addr, port, "slurm")
    else:
        return LaunchPlace()
    if not 0 <= place.rank < place.world_size:
        raise LaunchError(f"rank {place.rank} is outside [0, world size {place.world_size}) ({place.launcher})")
    return place


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


def resolve_backend(backend: str) -> str:
    """`auto` -> NCCL when CUDA is visible, else gloo."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("backend 'nccl' needs CUDA, and no CUDA device is visible; use backend='gloo' on CPU")
    return backend


def _device_for(backend: str, local_rank: int) -> torch.device:
    """NCCL ranks own cuda:LOCAL_RANK; gloo ranks compute on the CPU."""
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"local rank {local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                              "visible; start at most one process per GPU")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _env_of_existing_group() -> DistributedEnv:
    backend = str(dist.get_backend())
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = launch_place().local_rank if world_size > 1 else 0
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistributedEnv(rank, world_size, local_rank, device, backend)


def init_distributed(backend: str = "auto", env: Mapping[str, str] = os.environ) -> DistributedEnv:
    """Join the job the launcher describes (see the module's precedence), or run as a single process.

    Idempotent: a second call, or a call after someone else created the default process group, describes the
    existing group.
    """
    global _single_process_env
    if is_distributed():
        return _env_of_existing_group()
    place = launch_place(env)
    resolved = resolve_backend(backend)
    # torchrun promises a process group even to one process; Slurm's single task and a plain process get none
    if place.world_size == 1 and place.launcher != "torchrun":
        if _single_process_env is None:
            # the backend only picks the device here: no process group is created for one process
            _single_process_env = DistributedEnv(local_rank=place.local_rank,
                                                 device=_device_for(resolved, place.local_rank))
            logger.info("single process on %s (%s)", _single_process_env.device, place.launcher)
        return _single_process_env
    device = _device_for(resolved, place.local_rank)
    # device_id binds NCCL's communicator to this rank's GPU up front (and is meaningless for gloo)
    dist.init_process_group(resolved, init_method=f"tcp://{place.master_addr}:{place.master_port}", rank=place.rank,
                            world_size=place.world_size, device_id=device if resolved == "nccl" else None)
    logger.info("rank %d/%d (local %d) on %s with %s, launched by %s", place.rank, place.world_size,
                place.local_rank, device, resolved, place.launcher)
    return DistributedEnv(place.rank, place.world_size, place.local_rank, device, resolved)


def destroy_distributed() -> None:
    """Leave the process group (if any); safe to call when none exists."""
    global _single_process_env
    _single_process_env = None
    if is_distributed():
        dist.destroy_process_group()


def resolve_device(spec: str, env: Mapping[str, str] = os.environ) -> torch.device:
    """`auto` -> this process's GPU (its local rank) when CUDA is available, else the CPU; anything else as given."""
    if spec != "auto":
        device = torch.device(spec)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for but CUDA is not available; use 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", launch_place(env).local_rank)
    return torch.device("cpu")
