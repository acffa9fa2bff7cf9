"""What a stage's command line becomes on a cluster: one or more jobs, described by the stage itself.

Each stage package has a `jobs` module with `plan_jobs(args) -> (run directory, [JobSpec, ...])` for the arguments of
`python -m STAGE ARGS`; the Slurm launcher (`slurm.submit`) submits them without knowing any stage. A new command of
a stage (`pretrain distill`, `pretrain release`) is an entry in that stage's table, not a branch in the launcher.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobSpec:
    """One submission: a job (or an array of `len(argvs)` tasks) after the jobs of `after` (indices) succeed."""

    name: str
    argvs: list[list[str]]
    multi_task: bool  # one task per GPU over all nodes (training); otherwise one task
    after: tuple[int, ...] = ()
