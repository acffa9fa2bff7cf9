"""Command line of the pretraining stage: `python -m pretrain train CONFIG [key=value ...]`, `distill CONFIG
[key=value ...]`, `export RUN`, `plot RUN`."""

from __future__ import annotations

import argparse
import sys

from dinoforge.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="self-supervised pretraining (DINO + iBOT + KoLeo); resumes from the run's latest checkpoint",
        description="Run or resume a pretraining run. Single process, or several under torchrun / Slurm.")
    train.add_argument("config", help="YAML file, e.g. configs/pretrain/cpu_tiny.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.base_lr=1e-3 data.dataset=DIR")
    distill = commands.add_parser(
        "distill", help="teach a frozen teacher to one or more smaller students; resumes from the run's checkpoints",
        description="Run or resume a distillation run: every batch runs the teacher once and each student of "
                    "`students:` learns from it (objective dino: the teacher's heads; features: its tokens). Each "
                    "student's EMA is exported to RUN/students/NAME/export.")
    distill.add_argument("config", help="YAML file, e.g. configs/distill/cpu_tiny.yaml")
    distill.add_argument("overrides", nargs="*",
                         help="key=value overrides, e.g. teacher.weights=runs/pretrain/cpu_tiny data.dataset=DIR")
    export = commands.add_parser(
        "export", help="write a run's teacher (official backbone layout + heads, safetensors) to RUN/export (a "
                       "distillation run: each student's EMA to RUN/students/NAME/export)",
        description="Consolidate the teacher of a checkpoint (any number of shards) into RUN/export.")
    export.add_argument("run_dir", help="a pretrain run directory, e.g. runs/pretrain/cpu_tiny")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    plot = commands.add_parser(
        "plot", help="losses, teacher entropy against log K, schedules and k-NN of a run, as RUN/curves.png "
                     "(a distillation run: each student's, as RUN/students/NAME/curves.png)",
        description="Plot a run's metrics.jsonl: what a run that learns (or stalls) looks like.")
    plot.add_argument("run_dir", help="a pretrain run directory")
    plot.add_argument("--out", default=None, help="PNG path (default RUN/curves.png)")
    args = parser.parse_args(argv)
    # After parsing: --help answers without importing torch.
    from dinoforge.data.errors import DatasetError
    from dinoforge.models import CheckpointError

    try:
        if args.command == "plot":
            from pretrain.plot import plot_runs

            print("\n".join(str(path) for path in plot_runs(args.run_dir, args.out)))
            return 0
        if args.command == "export":
            from pathlib import Path

            if (Path(args.run_dir) / "students").is_dir():  # a distillation run: each student's EMA
                from pretrain.distill import export_students

                print("\n".join(str(p) for p in export_students(args.run_dir, args.step)))
                return 0
            from pretrain.export import export_run

            print(export_run(args.run_dir, args.step))
            return 0
        if args.command == "distill":
            from pretrain.distill import distill
            from pretrain.distill_config import DistillConfig

            print(distill(load_config(DistillConfig, args.config, args.overrides)))
            return 0
        from pretrain.train import train  # heavy imports after argument parsing keep --help fast
        from pretrain.train_config import TrainConfig

        cfg = load_config(TrainConfig, args.config, args.overrides)
        print(train(cfg))
        return 0
    # Bad paths, configs and weights files: one line. Anything else is a bug and keeps its traceback.
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, DatasetError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
