"""The jobs of `python -m evaluation ARGS` on a cluster (see dinoforge.jobs): one job, a task per GPU (feature
extraction is shared over the ranks)."""

from __future__ import annotations

from pathlib import Path

from dinoforge.jobs import JobSpec


def plan_jobs(args: list[str]) -> tuple[Path, list[JobSpec]]:
    from evaluation.__main__ import build_parser

    parsed = build_parser().parse_intermixed_args(args)
    return Path(parsed.out or Path("runs") / "eval"), [JobSpec(f"eval-{parsed.task}", [args], multi_task=True)]
