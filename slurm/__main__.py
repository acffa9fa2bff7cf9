"""Command line: `python -m slurm submit STAGE ARGS... [options]`, `python -m slurm local-cluster start|stop|status`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from slurm.stages import STAGES

EPILOG = """\
STAGE ARGS are what `python -m STAGE` takes; options this command does not know are passed on to the stage.
examples:
  python -m slurm submit pretrain configs/pretrain/vitl14.yaml data.dataset=DIR --profile gpu_cluster --nodes 4
  python -m slurm submit pretrain distill configs/distill/cpu_tiny.yaml teacher.weights=RUN data.dataset=DIR
  python -m slurm submit curate configs/curate/imagenette.yaml --profile gpu_cluster --array-parallelism 32
  python -m slurm submit curate embed configs/curate/imagenette.yaml        # one step
  python -m slurm submit curate embed configs/curate/imagenette.yaml --partitions 3   # rerun one array task
  python -m slurm submit evaluation knn --weights W --train D --val D --out runs/eval/knn
  python -m slurm submit pretrain configs/pretrain/cpu_tiny.yaml data.dataset=DIR --local   # in this process
  python -m slurm local-cluster start        # a real single-node Slurm on localhost (root), then:
  export SLURM_CONF=...                      # as printed by start / status
"""

# command-line flag -> cluster profile key
PROFILE_FLAGS = {"nodes": int, "gpus_per_node": int, "tasks_per_node": int, "cpus_per_task": int, "partition": str,
                 "account": str, "qos": str, "mem_gb": float, "timeout_min": int, "array_parallelism": int,
                 "max_requeues": int, "signal_delay_s": int}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slurm", description="Run dinoforge stages on Slurm (submitit).",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", help="submit a stage as Slurm jobs", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    submit.add_argument("stage", choices=STAGES)
    submit.add_argument("--profile", help="cluster profile: a name in configs/slurm/ (local, gpu_cluster) or a YAML")
    for key, kind in PROFILE_FLAGS.items():
        submit.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, default=None,
                            help=f"overrides the profile's {key}")
    submit.add_argument("--folder", help="job folders (default RUN_DIR/slurm/JOBID)")
    submit.add_argument("--local", action="store_true", help="run the jobs' code in this process instead")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the jobs; then each job that did not complete, with its log and how to rerun it")
    submit.add_argument("--wait-timeout", type=float, default=24 * 3600, help="seconds --wait waits at most")
    cluster = commands.add_parser("local-cluster", help="a single-node Slurm on localhost (munge, slurmctld, slurmd)")
    cluster.add_argument("action", choices=("start", "stop", "status"))
    cluster.add_argument("--root", help="its directory (default $DINOFORGE_SLURM_DIR or /tmp/dinoforge-slurm-UID)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, stage_args = build_parser().parse_known_args(argv)
    if args.command == "local-cluster":
        return local_cluster(args.action, args.root)
    return submit(args, stage_args)


def local_cluster(action: str, root: str | None) -> int:
    from pathlib import Path

    from slurm.local_cluster import DEFAULT_ROOT, LocalCluster, LocalClusterError

    cluster = LocalCluster(Path(root) if root else DEFAULT_ROOT)
    try:
        if action == "start":
            env = cluster.start()
            print(cluster.status())
            print(f"started; for the clients: export SLURM_CONF={env['SLURM_CONF']}")
        elif action == "stop":
            cluster.stop()
            print("stopped")
        else:
            print(cluster.status())
    except LocalClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def submit(args: argparse.Namespace, stage_args: list[str]) -> int:
    from pathlib import Path

    from dinoforge.config import ConfigError
    from slurm import submit as launcher
    from slurm.profile import load_profile

    try:
        if args.local:
            return launcher.run_local(args.stage, stage_args)
        overrides = [f"{k}={getattr(args, k)}" for k in PROFILE_FLAGS if getattr(args, k) is not None]
        profile = load_profile(args.profile, overrides)
        folder, submitted = launcher.submit(args.stage, stage_args, profile, Path(args.folder) if args.folder else None)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = [job for group in submitted for job in group]
    if not jobs:
        print("nothing to submit: every step is complete (its marker is current)")
        return 0
    for job in jobs:
        print(f"submitted {job.job_id}: {job.paths.stdout}")
    if not args.wait:
        return 0
    states = launcher.wait(jobs, timeout=args.wait_timeout)
    failed = [job for job in jobs if states[job.job_id] != "COMPLETED"]
    print(f"{len(jobs) - len(failed)} of {len(jobs)} jobs completed")
    for job in failed:  # each with its log; jobs cancelled because an earlier one failed say so
        print(launcher.failure_report(job, states[job.job_id]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
