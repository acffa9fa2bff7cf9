"""`python -m curate plan CONFIG [key=value ...] --images N --gpus G [--gpu-kind h100]`: the cost of a curation run
before it is submitted (see `curate.plan`). A bad value, an unknown GPU kind or a missing cost record is one line
saying what to do."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from curate.plan.gpu_speeds import GPUS

EXAMPLE = "python -m curate plan configs/curate/billion.yaml --images 1e9 --gpus 64"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m curate plan", description="Per step: work (images, GPU FLOPs, bytes), time, memory per task, "
        "disk and the Slurm array it would submit, from the benches' measured costs and stated GPU speeds.",
        epilog=f"example:\n  {EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (configs/curate/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. partitions=1024")
    parser.add_argument("--images", required=True, help="images in the pool, e.g. 1e9")
    parser.add_argument("--gpus", required=True, help="GPUs the array tasks share, one per task, e.g. 64")
    parser.add_argument("--gpu-kind", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    parser.add_argument("--cpus-per-gpu", default="10", help="CPU cores beside each GPU (default 10, as "
                        "configs/slurm/gpu_cluster.yaml's cpus_per_task)")
    parser.add_argument("--host-gb", default="480", help="host memory per task in GB (default 480, as "
                        "configs/slurm/gpu_cluster.yaml's mem_gb)")
    parser.add_argument("--seeds", default="0", help="seed images for retrieval (needed when the config has seeds)")
    parser.add_argument("--image-bytes", default="0", help="mean encoded image size (default: the cost record's "
                        "measured mean)")
    parser.add_argument("--costs", default="bench/costs.json", help="cost record written by the benches")
    return parser


def count(flag: str, text: str, example: str) -> int:
    """A whole number written as `1e9`, `1000000000` or `1_000_000`; ValueError saying what to give."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{flag} {text!r}: give a whole number, e.g. {flag} {example}")
    return int(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    # after parsing, so that --help answers without torch
    from curate.config import load_curate_config
    from curate.plan.costs import CostRecordError, load_costs
    from curate.plan.gpu_speeds import gpu_speed
    from curate.plan.model import PlanRequest, Rates, array_shape, plan_curation
    from curate.plan.text import render
    from dinoforge.config import ConfigError

    try:
        request = PlanRequest(
            images=count("--images", args.images, "1e9"), gpus=count("--gpus", args.gpus, "64"),
            gpu=gpu_speed(args.gpu_kind), cpus_per_gpu=count("--cpus-per-gpu", args.cpus_per_gpu, "10"),
            host_gb=count("--host-gb", args.host_gb, "480"), seeds=count("--seeds", args.seeds, "1e6"),
            image_bytes=count("--image-bytes", args.image_bytes, "120000"))
        cfg = load_curate_config(args.config, args.overrides)
        rates = Rates(load_costs(args.costs), request.gpu, request.cpus_per_gpu, Path(args.costs))
        plans = plan_curation(cfg, request, rates, lambda step: array_shape(args.config, args.overrides, step))
    except (CostRecordError, ValueError) as err:  # ConfigError is a ValueError
        print(f"{'config error' if isinstance(err, ConfigError) else 'error'}: {err}", file=sys.stderr)
        return 1 if isinstance(err, CostRecordError) else 2  # 1: the environment lacks a record; 2: a bad argument
    print(render(plans, request, rates, args.config))
    return 0
