"""Command line: `python -m curate run|ingest|embed|dedup|cluster|retrieve|shard|report CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from curate.rundir import STEPS, StepOrderError

COMMANDS = ("run", *STEPS)
EPILOG = """\
steps, in order:
  ingest    read the sources; manifest.parquet with one row per input (rejections with reasons)
  embed     float16 L2-normalised embeddings per partition under embeddings/MODEL/
  dedup     exact (sha256) and near-duplicate (kNN graph) removal, decontamination against eval sets
  cluster   hierarchical k-means over the deduplicated pool
  retrieve  select images: retrieval around seed sets, balanced sampling, or all
  shard     WebDataset tars of the selected images + shards/index.json
  report    report/index.html (counts, histograms, image grids)
  run       every step above; finished steps are skipped

examples:
  python -m curate run configs/curate/cpu_demo.yaml
  python -m curate dedup configs/curate/imagenette.yaml dedup.threshold=0.5
  python -m curate embed CONFIG --partitions 3        # one Slurm array task
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m curate", description="Curate an image pool into WebDataset "
                                     "shards (the DINOv2 LVD-142M data engine).", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, help="a step, or `run` for all of them")
    parser.add_argument("config", help="YAML config (configs/curate/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. partitions=64")
    parser.add_argument("--partitions", default=None, metavar="LIST",
                        help="embed, dedup and shard only: partitions to process, e.g. 3 or 0-7 or 1,4 "
                        "(default: all); the step completes in the call that finds every partition done")
    parser.add_argument("--force", action="store_true", help="redo the step(s) even when their marker is current")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # options may follow the key=value overrides
    # Imports after parsing, so `--help` answers without loading pyarrow/torch.
    from curate.config import load_curate_config
    from curate.errors import CurateError
    from curate.partition import parse_partition_list
    from curate.steps import PARTITIONED_STEPS, run_all, run_step
    from dinoforge.config import ConfigError
    from dinoforge.models import CheckpointError
    from dinoforge.run_logging import setup_logging

    try:
        cfg = load_curate_config(args.config, args.overrides)
        # a log file per invocation: the array tasks of one step each get their own
        setup_logging(cfg.run_dir / "logs" / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log",
                      level=cfg.log_level)
        if args.command == "run":
            if args.partitions is not None:
                print("--partitions applies to a single step (embed, dedup or shard), not to `run`", file=sys.stderr)
                return 2
            results = run_all(cfg, force=args.force)
        else:
            parts = None
            if args.partitions is not None:
                if args.command not in PARTITIONED_STEPS:
                    print(f"--partitions applies to {', '.join(PARTITIONED_STEPS)} only", file=sys.stderr)
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
            results = [run_step(args.command, cfg, parts, force=args.force)]
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
