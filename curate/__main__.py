"""Command line: `python -m curate run|STEP CONFIG [key=value ...]`, the steps being those of the registry
(`curate.steps.STEPS`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from curate.steps import STEPS, Step, StepOrderError, runner

EXAMPLES = """\
examples:
  python -m curate run configs/curate/cpu_demo.yaml
  python -m curate dedup configs/curate/imagenette.yaml dedup.threshold=0.5
  python -m curate embed CONFIG --partitions 3        # one Slurm array task
  python -m curate plan CONFIG --images 1e9 --gpus 64  # the cost of a run before it is spent (plan --help)
"""


def epilog(steps: Sequence[Step]) -> str:
    """The steps of the registry, in order, one line each, then examples."""
    width = max(len(s.name) for s in steps) + 2
    lines = [f"  {s.name:{width}s}{s.help}" for s in steps]
    lines.append(f"  {'run':{width}s}every step above; finished steps are skipped")
    return "steps, in order:\n" + "\n".join(lines) + "\n\n" + EXAMPLES


def build_parser(steps: Sequence[Step] = STEPS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m curate", description="Curate an image pool into WebDataset "
                                     "shards (the DINOv2 LVD-142M data engine).", epilog=epilog(steps),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", *(s.name for s in steps)], help="a step, or `run` for all of them")
    parser.add_argument("config", help="YAML config (configs/curate/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. partitions=64")
    partitioned = ", ".join(s.name for s in steps if s.partitioned)
    parser.add_argument("--partitions", default=None, metavar="LIST",
                        help=f"{partitioned} only: partitions to process, e.g. 3 or 0-7 or 1,4 "
                        "(default: all); the step completes in the call that finds every partition done")
    parser.add_argument("--force", action="store_true", help="redo the step(s) even when their marker is current")
    return parser


def main(argv: Sequence[str] | None = None, steps: Sequence[Step] = STEPS) -> int:
    """`python -m curate`; `steps` is the registry it runs (a test may pass its own)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # not a step: it runs nothing (curate.plan)
        from curate.plan.cli import main as plan_main

        return plan_main(argv[1:])
    args = build_parser(steps).parse_intermixed_args(argv)  # options may follow the key=value overrides
    # After parsing, so that `--help` answers without loading the step configs.
    from curate.config import load_curate_config
    from curate.errors import CurateError
    from curate.partition import parse_partition_list
    from dinoforge.config import ConfigError
    from dinoforge.errors import CheckpointError
    from dinoforge.run_logging import setup_logging

    partitioned = [s.name for s in steps if s.partitioned]

    try:
        cfg = load_curate_config(args.config, args.overrides)
        # a log file per invocation: the array tasks of one step each get their own
        setup_logging(cfg.run_dir / "logs" / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log",
                      level=cfg.log_level)
        if args.command == "run":
            if args.partitions is not None:
                print(f"--partitions applies to a single step ({', '.join(partitioned)}), not to `run`",
                      file=sys.stderr)
                return 2
            results = runner.run_all(steps, cfg, force=args.force)
        else:
            parts = None
            if args.partitions is not None:
                if args.command not in partitioned:
                    print(f"--partitions applies to {', '.join(partitioned)} only", file=sys.stderr)
                    return 2
                if args.force:
                    print("--force with --partitions would discard the partitions other tasks finished; force the "
                          "whole step once (without --partitions) instead", file=sys.stderr)
                    return 2
                try:
                    parts = parse_partition_list(args.partitions, cfg.partitions)
                except ValueError as err:
                    print(f"--partitions: {err}", file=sys.stderr)
                    return 2
            results = [runner.run_step(steps, args.command, cfg, parts, force=args.force)]
    # User errors (config, inputs, run directory, file system) get one line; anything else is a bug: traceback.
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except StepOrderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (CurateError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.step:9s} {r.status:8s} {r.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
