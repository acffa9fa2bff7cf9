"""Command line of the pretraining stage: `python -m pretrain train CONFIG [key=value ...]`, `distill CONFIG
[key=value ...]`, `export RUN`, `plot RUN`, `release SOURCE --out DIR`."""

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
    release = commands.add_parser(
        "release", help="a release folder: backbone + heads (safetensors), config.json, hf/ (transformers), optional "
                        "backbone.onnx, MODEL_CARD.md and SHA256SUMS, written atomically",
        description="Release a pretrain run's model, a distillation run's students (each in DIR/NAME, or one with "
                    "--student) or an export folder. Loaders (load_release, hubconf, evaluation --weights) check "
                    "SHA256SUMS before loading.")
    release.add_argument("source", help="a pretrain run, a distillation run or an export folder")
    release.add_argument("--out", required=True, help="the release folder (must be empty or absent, or --force)")
    release.add_argument("--name", default=None, help="the model's name in its card (default: the run's name)")
    release.add_argument("--eval", nargs="*", default=[], metavar="RESULTS.json",
                         help="evaluation results (python -m evaluation ... writes results_<task>.json) for the card; "
                              "RUN/eval/results_*.json are found by themselves")
    release.add_argument("--onnx", action="store_true", help="also write backbone.onnx, checked with onnxruntime")
    release.add_argument("--force", action="store_true", help="replace a non-empty --out")
    release.add_argument("--student", default=None, help="a distillation run: release this student only")
    release.add_argument("--license", default="other", help="the card's license id (Hugging Face front-matter)")
    args = parser.parse_args(argv)
    # After parsing: --help answers without importing torch.
    from dinoforge.data.errors import DatasetError
    from dinoforge.models import CheckpointError

    try:
        if args.command == "plot":
            from pretrain.plot import plot_runs

            print("\n".join(str(path) for path in plot_runs(args.run_dir, args.out)))
            return 0
        if args.command == "release":
            from pretrain.release import release

            print("\n".join(str(p) for p in release(args.source, args.out, name=args.name, evals=args.eval,
                                                      onnx=args.onnx, force=args.force, student=args.student,
                                                      license_id=args.license)))
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
