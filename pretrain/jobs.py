"""The jobs of `python -m pretrain ARGS` on a cluster (see dinoforge.jobs): training and distillation as one
multi-node multi-task job each, export and release as one single-task job each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dinoforge.config import load_config
from dinoforge.jobs import JobSpec


def _run_dir(schema: type, argv: list[str]) -> Path:
    config, overrides = argv[1], [a for a in argv[2:] if not a.startswith("-")]
    return load_config(schema, config, overrides).run_dir


def _train(argv: list[str]) -> tuple[Path, list[JobSpec]]:
    from pretrain.train_config import TrainConfig

    run_dir = _run_dir(TrainConfig, argv)
    return run_dir, [JobSpec(f"pretrain-{run_dir.name}", [argv], multi_task=True)]


def _distill(argv: list[str]) -> tuple[Path, list[JobSpec]]:
    from pretrain.distill_config import DistillConfig

    run_dir = _run_dir(DistillConfig, argv)
    return run_dir, [JobSpec(f"distill-{run_dir.name}", [argv], multi_task=True)]


def _export(argv: list[str]) -> tuple[Path, list[JobSpec]]:
    return Path(argv[1]), [JobSpec("pretrain-export", [argv], multi_task=False)]


def _release(argv: list[str]) -> tuple[Path, list[JobSpec]]:
    return Path(argv[1]), [JobSpec("pretrain-release", [argv], multi_task=False)]


COMMANDS: dict[str, Callable[[list[str]], tuple[Path, list[JobSpec]]]] = {
    "train": _train, "distill": _distill, "export": _export, "release": _release}


def plan_jobs(args: list[str]) -> tuple[Path, list[JobSpec]]:
    """`[COMMAND] CONFIG|RUN [overrides]`; without a command, `train` (the stage's main job). Export and release
    keep their job logs in RUN/slurm."""
    argv = args if args[:1] and args[0] in COMMANDS else ["train", *args]
    if len(argv) < 2:
        raise ValueError(f"pretrain {argv[0]} needs a CONFIG (or RUN for export and release): python -m slurm "
                         f"submit pretrain {argv[0]} CONFIG [key=value ...]")
    return COMMANDS[argv[0]](argv)
