"""Rules of the Slurm launcher, one test each (issue 26 point 9): a stage that exits non-zero fails its job, the
planned run folder follows every override, a profile refuses zero resources, and the rendezvous host is the first
of a comma-separated node list. Each test was checked against the one-line bug it names."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from dinoforge.config import ConfigError
from dinoforge.launch import first_host
from slurm import submit
from slurm.profile import load_profile

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "pretrain" / "cpu_tiny.yaml")


JOB_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)


class SignalNotPassed(Exception):
    """Raised by the handler a test leaves in place: StageJob did not install its own."""


def refuse(signum: int, frame: object) -> None:
    raise SignalNotPassed(signal.Signals(signum).name)


@pytest.fixture
def stage_exits_with(monkeypatch, tmp_path):
    """StageJob running a fake stage whose main returns the given code, after sending itself the signals given
    (the job signals' handlers restored afterwards)."""
    monkeypatch.chdir(tmp_path)
    previous = {sig: signal.getsignal(sig) for sig in JOB_SIGNALS}

    def run(code: int, *received: signal.Signals) -> int:
        def main(argv: list[str]) -> int:
            for sig in received:
                os.kill(os.getpid(), sig)
            return code

        monkeypatch.setattr(submit, "stage_main", lambda stage: main)
        for sig in (signal.SIGTERM, signal.SIGCONT):
            signal.signal(sig, refuse)
        return submit.StageJob("pretrain", ["train", CONFIG], str(tmp_path))()

    yield run
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("code", [1, 2, 3])
def test_a_stage_exiting_non_zero_fails_its_job(stage_exits_with, code):
    """Bug caught: `if code:` turned around or dropped, which reports a failed stage as a successful job."""
    with pytest.raises(RuntimeError, match=f"exited with {code}"):
        stage_exits_with(code)


def test_a_stage_exiting_zero_completes_its_job(stage_exits_with):
    assert stage_exits_with(0) == 0


def test_sigterm_and_sigcont_pass_over_a_running_stage_and_are_noted(stage_exits_with, capfd):
    """Slurm sends SIGCONT with its signals and SIGTERM before a kill: the stage runs on (bug caught: the handlers
    not installed, the stage ends on the test's refusing handler)."""
    assert stage_exits_with(0, signal.SIGTERM, signal.SIGCONT) == 0
    err = capfd.readouterr().err
    assert "signal SIGTERM received: the job carries on" in err and "signal SIGCONT received" in err


def test_the_passing_signal_note_lets_a_nested_usr2_exception_through(monkeypatch):
    """A USR2 handled while the note is written raises submitit's UncompletedJobError when the job is out of requeues:
    it must reach submitit, which fails the job (bug caught: the note written through `logging`, which swallows it,
    as submitit's own bypass handler does, and the job runs on into TIMEOUT)."""
    from submitit.core.utils import UncompletedJobError

    def usr2_handled_during_the_write(fd: int, data: bytes) -> int:
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    monkeypatch.setattr(os, "write", usr2_handled_during_the_write)
    with pytest.raises(UncompletedJobError, match="timed-out too many times"):
        submit.note_passing_signal(signal.SIGCONT, None)


@pytest.mark.parametrize("outcome,state", [("success", "COMPLETED"), ("error", "FAILED")])
def test_wait_reads_a_forgotten_jobs_outcome_from_its_result(monkeypatch, tmp_path, outcome, state):
    """A job the controller forgot (no accounting) is judged by submitit's result pickle: an error is FAILED."""
    result = tmp_path / "result.pkl"
    result.write_bytes(pickle.dumps((outcome, "traceback or value")))
    job = SimpleNamespace(job_id="41", paths=SimpleNamespace(result_pickle=result))
    monkeypatch.setattr(submit, "job_state", lambda job: "UNKNOWN")
    assert submit.wait([job], timeout=5, poll_s=0.01) == {"41": state}


@pytest.mark.parametrize("args", [
    [CONFIG, "name=mine", "data.dataset=DATA", "output_dir=OUT"],
    [CONFIG, "output_dir=OUT", "data.dataset=DATA", "name=mine"],
    ["train", CONFIG, "data.dataset=DATA", "output_dir=OUT", "total_steps=3", "name=mine"],
])
def test_plan_pretrain_puts_the_run_where_every_override_says(tmp_path, args):
    """Bug caught: an override dropped (the first or the last) while planning, which queues the job with one run
    folder and watches another."""
    args = [a.replace("OUT", str(tmp_path)).replace("DATA", str(tmp_path / "images")) for a in args]
    run_dir, (spec,) = submit.plan("pretrain", args)
    assert run_dir == tmp_path / "mine"
    assert spec.argvs == [args if args[0] == "train" else ["train", *args]] and spec.multi_task


@pytest.mark.parametrize("override", ["cpus_per_task=0", "cpus_per_task=-1", "nodes=0", "tasks_per_node=-1"])
def test_profile_refuses_zero_or_negative_resources(override):
    """Bug caught: `cpus_per_task=0` accepted (sbatch then rejects the job, or Slurm gives it a default)."""
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_profile("local", [override])


def test_profile_keeps_positive_resources():
    profile = load_profile("local", ["cpus_per_task=3", "nodes=2", "tasks_per_node=4"])
    assert (profile.cpus_per_task, profile.nodes, profile.ntasks_per_node) == (3, 2, 4)


@pytest.mark.parametrize("nodelist,host", [
    ("node1,node2", "node1"), ("cpu7,gpu[01-02]", "cpu7"), ("gpu[03,07]", "gpu03"), ("gpu[10-12],cpu1", "gpu10"),
    ("node1", "node1"),
])
def test_rendezvous_is_the_first_host_of_a_comma_separated_list(nodelist, host):
    """Bug caught: the list not split at commas (a rendezvous address 'node1,node2' that resolves nowhere)."""
    assert first_host(nodelist) == host


@pytest.mark.parametrize("multi_task,nodes,tasks,gpus", [(True, 2, 4, 4), (False, 1, 1, 1)])
def test_executor_gives_training_every_node_and_other_jobs_one_task(tmp_path, multi_task, nodes, tasks, gpus):
    """Training: one task per GPU on every node; curation and export: one task, at most one GPU. Memory in MB,
    limits and requeues as the profile says."""
    profile = load_profile("local", ["nodes=2", "gpus_per_node=4", "mem_gb=1.5", "cpus_per_task=3", "timeout_min=7",
                                     "signal_delay_s=30", "max_requeues=5"])
    executor = submit.make_executor(tmp_path, profile, multi_task)
    params = executor.parameters
    assert (params["nodes"], params["ntasks_per_node"], params["gpus_per_node"]) == (nodes, tasks, gpus)
    assert (params["cpus_per_task"], params["mem"], params["time"], params["signal_delay_s"]) == (3, "1536MB", 7, 30)
    assert executor.max_num_timeout == 5


def test_executor_on_cpu_asks_for_no_gpus(tmp_path):
    executor = submit.make_executor(tmp_path, load_profile("local", []), multi_task=True)
    assert "gpus_per_node" not in executor.parameters
