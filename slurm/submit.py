"""Submitting a stage as submitit jobs, as the stage's own table plans them (`STAGE.jobs`): training and
distillation as one multi-node multi-task job, curation as a chain of jobs (partitioned steps as arrays with bounded
parallelism, then a closing task) linked by `afterok` dependencies, evaluation as one job. A job that fails
cancels the jobs after it (`--kill-on-invalid-dep`); `failure_report` says what it ran, where its log is and how to
rerun it alone (one array task: `curate STEP CONFIG --partitions P`), and a resubmitted curation run leaves out the
steps that are complete.

Every job calls the stage's own command-line entry (`pretrain.__main__.main([...])` ...), so a job runs exactly what
`python -m STAGE ...` runs; ranks and the rendezvous come from Slurm's variables through `dinoforge.launch`.
Jobs are `Checkpointable`: on USR2 (preemption, or `signal_delay_s` before the time limit) submitit requeues them
(after a time-out at most `max_requeues` times) and the requeued job resumes from the stage's own state (the latest
complete training checkpoint, the curation step markers).
"""

from __future__ import annotations

import importlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import submitit

from dinoforge.jobs import JobSpec
from slurm.profile import ClusterProfile
from slurm.stages import STAGES

TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED_FINAL")


def stage_main(stage: str):
    """The command-line entry of a stage (imported in the job, not at submission)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    return importlib.import_module(f"{stage}.__main__").main


def note_passing_signal(signum: int, frame: object) -> None:
    """Slurm's SIGTERM and SIGCONT pass over the job, as in submitit, noted with one bare write. submitit's own handler
    logs through `logging`: a USR2 handled while that call runs nests inside it, and `logging` swallows the exception
    by which a job out of requeues ends, so that job would run on into its time limit (TIMEOUT instead of FAILED)."""
    os.write(2, f"signal {signal.Signals(signum).name} received: the job carries on\n".encode())


class StageJob(submitit.helpers.Checkpointable):
    """`python -m STAGE ARGV` inside a job; a non-zero exit fails the job. Requeued as is: the stage resumes itself."""

    def __init__(self, stage: str, argv: list[str], cwd: str) -> None:
        self.stage, self.argv, self.cwd = stage, list(argv), cwd

    def __call__(self) -> int:
        os.chdir(self.cwd)  # relative paths in configs mean the same in the job as at submission
        for passing in (signal.SIGTERM, signal.SIGCONT):
            signal.signal(passing, note_passing_signal)
        code = stage_main(self.stage)(self.argv)
        if code:
            raise RuntimeError(f"python -m {self.stage} {' '.join(self.argv)} exited with {code}")
        # The work is done and written: a USR2 arriving now (the time limit or a preemption, while submitit writes the
        # result) would kill the task and mark a finished job FAILED, with nothing left to requeue.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return 0

    def __repr__(self) -> str:
        return f"StageJob(python -m {self.stage} {' '.join(self.argv)})"


def plan(stage: str, args: list[str]) -> tuple[Path, list[JobSpec]]:
    """The run directory and the jobs of `python -m STAGE ARGS`, from the stage's own table (`STAGE.jobs`), checked
    here: a bad config fails before submission."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    return importlib.import_module(f"{stage}.jobs").plan_jobs(args)


def make_executor(folder: Path, profile: ClusterProfile, multi_task: bool) -> submitit.SlurmExecutor:
    """A submitit Slurm executor with the profile's resources; job folders `folder/%j`."""
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=profile.max_requeues)
    params = {
        "partition": profile.partition, "account": profile.account, "qos": profile.qos,
        "constraint": profile.constraint, "exclude": profile.exclude,
        "nodes": profile.nodes if multi_task else 1,
        "ntasks_per_node": profile.ntasks_per_node if multi_task else 1,
        "gpus_per_node": (profile.gpus_per_node if multi_task else min(1, profile.gpus_per_node)) or None,
        "cpus_per_task": profile.cpus_per_task,
        "mem": f"{int(profile.mem_gb * 1024)}MB" if profile.mem_gb else None,
        "time": profile.timeout_min, "signal_delay_s": profile.signal_delay_s,
        "array_parallelism": profile.array_parallelism, "setup": list(profile.setup) or None,
        "additional_parameters": dict(profile.additional) or None,
    }
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def submit(stage: str, args: list[str], profile: ClusterProfile, folder: Path | None = None,
           cwd: str | None = None) -> tuple[Path, list[list[submitit.Job]]]:
    """Submit the jobs of `python -m STAGE ARGS`; returns the job folder and the jobs of each JobSpec."""
    cwd = cwd or os.getcwd()
    run_dir, specs = plan(stage, args)
    folder = Path(folder or Path(cwd) / run_dir / "slurm")
    submitted: list[list[submitit.Job]] = []
    for spec in specs:
        executor = make_executor(folder, profile, spec.multi_task)
        params: dict[str, object] = {"job_name": spec.name}
        if spec.after:
            ids = [job.job_id.split("_")[0] for i in spec.after for job in submitted[i]]
            params["dependency"] = "afterok:" + ":".join(dict.fromkeys(ids))
            # a failed job cancels the jobs after it (state CANCELLED), rather than leaving them pending forever
            params["additional_parameters"] = {**profile.additional, "kill_on_invalid_dep": "yes"}
        executor.update_parameters(**params)
        fns = [StageJob(stage, argv, cwd) for argv in spec.argvs]
        if len(fns) == 1:
            submitted.append([executor.submit(fns[0])])
        else:
            with executor.batch():
                jobs = [executor.submit(fn) for fn in fns]
            submitted.append(jobs)
    return folder, submitted


def run_local(stage: str, args: list[str], cwd: str | None = None) -> int:
    """The jobs' code path in this process, one job after another (array tasks in turn)."""
    _, specs = plan(stage, args)
    for spec in specs:
        for argv in spec.argvs:
            StageJob(stage, argv, cwd or os.getcwd())()
    return 0


def job_state(job: submitit.Job) -> str:
    """The scheduler's state of a job: `scontrol show job` while the controller remembers it (clusters without
    accounting, such as the local one, have no sacct), else sacct through submitit's watcher."""
    state = scontrol_fields(job.job_id).get("JobState")
    if state:
        return state
    state = job.watcher.get_state(job.job_id, mode="force")
    return state.split()[0] if state else "UNKNOWN"


def wait(jobs: list[submitit.Job], timeout: float, poll_s: float = 2.0) -> dict[str, str]:
    """Each job's final state once all are finished; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    pending = list(jobs)
    while pending:
        for job in pending:
            state = job_state(job)
            if state == "UNKNOWN" and job.paths.result_pickle.exists():
                state = "COMPLETED" if submitit.core.utils.pickle_load(job.paths.result_pickle)[0] == "success" \
                    else "FAILED"
            if state in TERMINAL_STATES:
                states[job.job_id] = state
        pending = [job for job in pending if job.job_id not in states]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"jobs {[j.job_id for j in pending]} not finished after {timeout:.0f} s: "
                               f"{ {j.job_id: job_state(j) for j in pending} }")
        if pending:
            time.sleep(poll_s)
    return states


def log_tail(job: submitit.Job, lines: int = 30) -> str:
    text = []
    for path in (job.paths.stdout, job.paths.stderr):
        if path.is_file():
            text.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(text)


def job_command(job: submitit.Job) -> tuple[str, list[str]] | None:
    """The stage and arguments a job runs, from its submitted pickle (None when that cannot be read)."""
    try:
        function = job.submission().function
    except (OSError, EOFError, AttributeError, ValueError):
        return None
    return (function.stage, function.argv) if isinstance(function, StageJob) else None


def failure_report(job: submitit.Job, state: str, lines: int = 8) -> str:
    """What a job that did not complete ran, where its log is (with its last lines), and how to rerun it alone."""
    command = job_command(job)
    what = f"python -m {command[0]} {shlex.join(command[1])}" if command else "?"
    if state == "CANCELLED" and not job.paths.stderr.exists():
        return f"job {job.job_id} {state} ({what}): never started: {scontrol_fields(job.job_id).get('Reason', '')}"
    text = [f"job {job.job_id} {state} ({what})", f"  log: {job.paths.stderr}"]
    if job.paths.stderr.is_file():
        log = job.paths.stderr.read_text(errors="replace").splitlines()
        # the stage's own last words come before submitit's traceback of the job function (which only says that
        # the stage exited non-zero); a crash inside the stage is that traceback's end
        cut = next((i for i, line in enumerate(log) if "Submitted job triggered an exception" in line), None)
        shown = log[:cut][-lines:] + log[-2:] if cut else log[-lines:]
        text += ["    " + line[-400:] for line in shown]
    if command:
        text.append(f"  rerun it alone: python -m slurm submit {command[0]} {shlex.join(command[1])}")
    return "\n".join(text)


def scontrol_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` of one job as a dict (empty once the controller has forgotten the job)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)
