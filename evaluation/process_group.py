"""Process group and device of an evaluation process, from torchrun's (or Slurm's) environment variables."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchPlace:
    """Where the launcher put this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_place(env: Mapping[str, str] = os.environ) -> LaunchPlace:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (a
    task of `srun` without torchrun), else a single process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchPlace(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchPlace(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")))
    return LaunchPlace()


def init_from_env(env: Mapping[str, str] = os.environ) -> bool:
    """Join the process group that the launcher describes; True when this call created it.

    Rendezvous goes through MASTER_ADDR / MASTER_PORT (torchrun sets them; under plain `srun` export them, or
    use `python -m slurm submit`). A world of one process runs without a process group.
    """
    if dist.is_initialized():
        return False
    place = launch_place(env)
    if place.world_size <= 1:
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(
            f"{place.world_size} processes launched but {', '.join(missing)} not set; launch with torchrun or "
            "`python -m slurm submit`, or export the rendezvous address yourself"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(place.local_rank)
    os.environ.update({k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT")})  # env:// reads them from there
    dist.init_process_group(backend=backend, init_method="env://", rank=place.rank, world_size=place.world_size)
    logger.info("process group: rank %d of %d (%s)", place.rank, place.world_size, backend)
    return True


def resolve_device(spec: str, env: Mapping[str, str] = os.environ) -> torch.device:
    """`auto` -> this process's GPU (its local rank) when CUDA is available, else the CPU; anything else as given."""
    if spec != "auto":
        device = torch.device(spec)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"features.device={spec!r} but CUDA is not available; use 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", launch_place(env).local_rank)
    return torch.device("cpu")
