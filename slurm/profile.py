"""Cluster profiles: what a Slurm cluster asks of a job (partition, account, GPUs, limits), as a strict config.

A profile is a YAML file in configs/slurm/ (or any path) merged onto `ClusterProfile`, then the command line's
flags on top; an unknown key is an error that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dinoforge.config import ConfigError, load_config

PROFILES_DIR = Path(__file__).resolve().parents[1] / "configs" / "slurm"


@dataclass
class ClusterProfile:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one task per GPU, or 1 on CPU
    cpus_per_task: int = 1
    mem_gb: float | None = None
    timeout_min: int = 60
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to requeue from the latest checkpoint
    max_requeues: int = 3  # requeues after a time-out (preemptions requeue without limit)
    array_parallelism: int = 16  # array tasks running at once
    additional: dict[str, str] = field(default_factory=dict)  # further sbatch options, without the leading --
    setup: list[str] = field(default_factory=list)  # shell lines run before the job starts

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


def profile_path(name: str) -> Path:
    """A profile name (`local` -> configs/slurm/local.yaml) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    candidate = PROFILES_DIR / f"{name}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown cluster profile {name!r}; known profiles: {', '.join(known)} (or give a YAML path)")
    return candidate


def load_profile(name: str | None, overrides: list[str] | tuple[str, ...] = ()) -> ClusterProfile:
    profile = load_config(ClusterProfile, profile_path(name) if name else None, overrides)
    if profile.nodes < 1 or profile.ntasks_per_node < 1 or profile.cpus_per_task < 1:
        raise ConfigError(f"nodes, tasks per node and cpus_per_task must be >= 1, got {profile}")
    return profile
