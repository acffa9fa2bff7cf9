"""The jobs of `python -m curate ARGS` on a cluster (see dinoforge.jobs): the steps as a chain of jobs, a partitioned
step as an array over its partitions followed by a closing task, linked by `afterok` dependencies."""

from __future__ import annotations

from pathlib import Path

from dinoforge.jobs import JobSpec


def plan_jobs(args: list[str]) -> tuple[Path, list[JobSpec]]:
    """`[STEP] CONFIG [overrides] [--partitions LIST]`: one step, or (`run` or no step) every step in order.

    `run` leaves out the leading steps that are complete already (their markers current at submission), so that
    resubmitting a run after a failure queues only what is left. `--partitions` (a partitioned step only) runs
    those partitions as the array, then the closing task; how one failed array task is rerun alone.
    """
    from curate.config import load_curate_config
    from curate.partition import parse_partition_list
    from curate.steps import STEPS as REGISTRY

    steps_in_order = tuple(step.name for step in REGISTRY)
    partitioned = {step.name for step in REGISTRY if step.partitioned}
    args, partitions_spec = _pop_option(args, "--partitions")
    if args and args[0] in (*steps_in_order, "run"):
        command, rest = args[0], args[1:]
    else:
        command, rest = "run", args
    if not rest:
        raise ValueError("curate needs a CONFIG: python -m slurm submit curate [STEP] CONFIG [key=value ...]")
    config, overrides = rest[0], rest[1:]
    cfg = load_curate_config(config, overrides)
    if partitions_spec is not None and command not in partitioned:
        raise ValueError(f"--partitions applies to one partitioned step ({', '.join(sorted(partitioned))}), "
                         f"not to {command!r}: python -m slurm submit curate STEP CONFIG --partitions LIST")
    partitions = (parse_partition_list(partitions_spec, cfg.partitions) if partitions_spec is not None
                  else list(range(cfg.partitions)))
    if command == "run":
        done = completed_steps(cfg)
        steps = steps_in_order[next((i for i, name in enumerate(steps_in_order) if name not in done),
                                    len(steps_in_order)):]
    else:
        steps = (command,)
    jobs: list[JobSpec] = []
    for step in steps:
        after = (len(jobs) - 1,) if jobs else ()
        if step in partitioned and (cfg.partitions > 1 or partitions_spec is not None):
            tasks = [[step, config, *overrides, "--partitions", str(p)] for p in partitions]
            jobs.append(JobSpec(f"curate-{step}", tasks, multi_task=False, after=after))
            # the closing task finds every partition done and writes the step's marker
            jobs.append(JobSpec(f"curate-{step}-close", [[step, config, *overrides]], False, (len(jobs) - 1,)))
        else:
            jobs.append(JobSpec(f"curate-{step}", [[step, config, *overrides]], multi_task=False, after=after))
    return cfg.run_dir, jobs


def _pop_option(args: list[str], name: str) -> tuple[list[str], str | None]:
    """`args` without `name VALUE` (or `name=VALUE`), and VALUE (None when absent)."""
    rest, value = [], None
    items = iter(args)
    for arg in items:
        if arg == name:
            value = next(items, None)
            if value is None:
                raise ValueError(f"{name} needs a value, e.g. {name} 3 or {name} 0-7")
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, value


def completed_steps(cfg) -> set[str]:
    """The curation steps whose markers are current for `cfg` (what `python -m curate` would skip)."""
    from curate.rundir import RunDir
    from curate.steps import STEPS as REGISTRY
    from curate.steps.runner import StepOrderError, expected_fingerprint, step_named

    rundir = RunDir(cfg.run_dir)
    done = set()
    for step in REGISTRY:
        try:
            expected = expected_fingerprint(REGISTRY, rundir, step.name,
                                            lambda name: step_named(REGISTRY, name).config(cfg),
                                            required=step.requires_upstream)
        except StepOrderError:
            continue
        if rundir.read_marker(step.name) is not None and rundir.is_done(step.name, expected):
            done.add(step.name)
    return done


