"""One writer per run folder (issue 26 point 6): a second command refuses naming the holder (host and PID), a lock
left by a dead process is taken over with a warning, and a requeued Slurm job takes over its previous attempt's."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dinoforge.run_lock import LOCK_FILE, RunLock, RunLockedError, lock_run_folder, process_start_ticks

REPO = Path(__file__).resolve().parents[1]
HOLD = textwrap.dedent("""
    import sys
    from dinoforge.run_lock import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    sys.stdin.readline()  # hold until the test says so (or closes stdin)
""")

pytestmark = pytest.mark.timeout(120)


class Holder:
    """Another process holding the lock of `run_dir` until `release()` or `kill()`; started synchronously."""

    def __init__(self, run_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("SLURM_JOB_ID", None)
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.proc.communicate("\n", timeout=30)
        assert self.proc.returncode == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)


@pytest.fixture
def held(tmp_path):
    holder = Holder(tmp_path)
    yield holder
    if holder.proc.poll() is None:
        holder.kill()


def write_lock(run_dir: Path, **fields: object) -> None:
    """A lock file as a process that is gone (or on another host) left it, with no flock held."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": 0, "job": "", "since": 0.0, **fields}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))


def recorded(run_dir: Path) -> dict:
    return json.loads((run_dir / LOCK_FILE).read_text())


def test_second_holder_refused_naming_host_and_pid(tmp_path, held):
    with pytest.raises(RunLockedError) as info:
        RunLock(tmp_path).acquire()
    message = str(info.value)
    assert f"PID {held.proc.pid} on host {socket.gethostname()}" in message and str(tmp_path) in message
    assert "\n" not in message
    held.release()
    with RunLock(tmp_path):
        assert recorded(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, held, caplog):
    held.kill()  # no release: the file stays, naming a dead PID
    assert recorded(tmp_path)["pid"] == held.proc.pid
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        assert recorded(tmp_path)["pid"] == os.getpid()
    assert f"PID {held.proc.pid}" in caplog.text and "no longer runs" in caplog.text


def test_reused_pid_is_not_the_holder(tmp_path, caplog):
    """The recorded PID runs again, but as another process (another start time): the lock is stale."""
    parent = os.getppid()
    write_lock(tmp_path, pid=parent, started=process_start_ticks(parent) + 1)
    with caplog.at_level(logging.WARNING), RunLock(tmp_path):
        pass
    assert "no longer runs" in caplog.text


def test_live_pid_without_flock_still_refused(tmp_path):
    """A file system that keeps no flock: the live PID on this host decides."""
    parent = os.getppid()
    write_lock(tmp_path, pid=parent, started=process_start_ticks(parent))
    with pytest.raises(RunLockedError, match=f"PID {parent} "):
        RunLock(tmp_path).acquire()


def test_holder_on_another_host_refused_with_how_to_remove_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    write_lock(tmp_path, host="gpu-node-7", pid=4242, job="11")
    with pytest.raises(RunLockedError) as info:
        RunLock(tmp_path).acquire()
    assert "PID 4242 on host gpu-node-7, Slurm job 11" in str(info.value)
    assert f"delete {tmp_path / LOCK_FILE}" in str(info.value)


@pytest.mark.parametrize("host", ["gpu-node-7", "this host"])
def test_requeued_slurm_job_takes_over_its_previous_attempt(tmp_path, monkeypatch, caplog, host):
    """Slurm requeues a job once it has ended; the new attempt (same job id, new PID, any node) takes over."""
    monkeypatch.setenv("SLURM_JOB_ID", "11")
    write_lock(tmp_path, host=socket.gethostname() if host == "this host" else host, pid=999_999_999, job="11")
    with caplog.at_level(logging.INFO), RunLock(tmp_path):
        assert recorded(tmp_path)["job"] == "11" and recorded(tmp_path)["pid"] == os.getpid()
    assert "previous attempt" in caplog.text and "no longer runs" not in caplog.text


def test_same_process_may_take_its_own_lock_again(tmp_path):
    first = RunLock(tmp_path).acquire()
    second = RunLock(tmp_path).acquire()  # e.g. a second Trainer on the same run in one notebook
    first.release()  # the first handle gave the lock over: releasing it leaves the second one's file
    assert recorded(tmp_path)["pid"] == os.getpid()
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_half_written_lock_file_of_a_live_process_refused(tmp_path, held):
    (tmp_path / LOCK_FILE).write_text("")  # the flock still says the holder lives
    with pytest.raises(RunLockedError, match="another process"):
        RunLock(tmp_path).acquire()


def test_lock_run_folder_single_process(tmp_path, held):
    with pytest.raises(RunLockedError):
        lock_run_folder(tmp_path, is_main=True)
    assert lock_run_folder(tmp_path, is_main=False) is None  # other ranks take nothing (one process: no group)


def test_second_curate_run_refuses_in_one_line(tmp_path, held, capsys):
    from curate.__main__ import main

    config = REPO / "configs" / "curate" / "cpu_demo.yaml"
    held_dir = tmp_path
    code = main(["run", str(config), f"runs_root={held_dir.parent}", f"name={held_dir.name}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"PID {held.proc.pid} on host {socket.gethostname()}" in err
    assert not (held_dir / "config.yaml").exists()  # refused before writing anything


def test_file_released_between_open_and_flock_is_not_the_lock(tmp_path, monkeypatch):
    """The holder unlinks the file just after we opened it: locking that orphan would let a third process in."""
    real = RunLock._flock
    released = []

    def holder_releases_first(fd: int, path: Path) -> bool:
        if not released:
            released.append(path)
            path.unlink()
        return real(fd, path)

    (tmp_path / LOCK_FILE).write_text("")
    monkeypatch.setattr(RunLock, "_flock", staticmethod(holder_releases_first))
    with RunLock(tmp_path):
        assert released and recorded(tmp_path)["pid"] == os.getpid()
