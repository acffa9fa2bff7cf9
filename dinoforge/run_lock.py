"""One writer per run folder: `RUN/run.lock` names the process that holds the folder (host, PID, Slurm job).

Two commands on one run folder at once (a user relaunching beside a requeued job) would interleave their writes to
config.yaml, the manifest, metrics.jsonl and the checkpoints. The second one refuses, naming the holder.

Whether the holder still runs:
- the file is also `flock`ed while held: the kernel drops that lock when the holder dies, however it dies, and on
  file systems that share locks between hosts (NFS) it answers for other hosts too;
- without the flock (the holder died, or the file system keeps locks per host), the recorded PID decides on the
  same host (alive, and started at the recorded time: PIDs are reused);
- on another host, a holder from this same Slurm job is this job's own earlier attempt (Slurm requeues a job only
  once it has ended; the requeued attempt is a new PID, on any node): taken over. Any other holder on another host
  cannot be checked from here: refused, saying how to remove the lock if that process is gone.
A lock left by a dead process is taken over with a warning.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
_held: dict[Path, RunLock] = {}  # locks this process holds, by path: a second acquire in-process takes them over


class RunLockedError(OSError):
    """Another live process holds the run folder. An OSError, so that every stage's CLI prints it as one line."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to tell whether it still runs, and to tell the user who it is."""

    host: str
    pid: int
    started: int  # the process's start time in clock ticks after boot (/proc/PID/stat), 0 when unknown
    job: str  # SLURM_JOB_ID, "" outside Slurm
    since: float  # when it took the lock (epoch seconds)

    def describe(self) -> str:
        job = f", Slurm job {self.job}" if self.job else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"PID {self.pid} on host {self.host}{job}, since {since}"


def process_start_ticks(pid: int) -> int:
    """A process's start time (clock ticks after boot), 0 when it cannot be read (no /proc, no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # field 22; the command name (field 2) may hold spaces and parentheses, so count from its closing one
    return int(stat.rsplit(")", 1)[1].split()[19])


def this_process() -> Holder:
    return Holder(socket.gethostname(), os.getpid(), process_start_ticks(os.getpid()),
                  os.environ.get("SLURM_JOB_ID", ""), time.time())


def pid_alive(pid: int, started: int) -> bool:
    """Whether `pid` runs on this host and is the process that started at `started` (0: not recorded)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return not started or process_start_ticks(pid) in (0, started)


def _read_holder(fd: int) -> Holder | None:
    """The holder recorded in the lock file, None when it is empty or unreadable (a writer died mid-write)."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None


class RunLock:
    """The lock of one run folder; `acquire` raises RunLockedError when a live process holds it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self.path in _held:  # this process took it already (a second Trainer in a notebook or a test)
            _held[self.path].release()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd, self.path)
                if not locked:
                    holder = _read_holder(fd)
                    raise RunLockedError(self._refusal(holder, checked=True))
                if not self._still_named(fd):
                    os.close(fd)  # the holder released (unlinked) it between our open and flock: start over
                    continue
                self._judge(_read_holder(fd))
                self._write(fd, this_process())
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            _held[self.path] = self
            atexit.register(self.release)
            return self

    def _still_named(self, fd: int) -> bool:
        """Whether the file open as `fd` is still the one at `self.path`."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _flock(fd: int, path: Path) -> bool:
        """Take the flock; False when another process has it. File systems without flock: True (PIDs decide)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:  # ENOLCK, EOPNOTSUPP (e.g. Lustre without -o flock)
            logger.debug("no flock on %s (%s): judging its holder by host and PID", path, err)
        return True

    def _judge(self, holder: Holder | None) -> None:
        """Raise RunLockedError unless the recorded holder is gone (or is this process); log a takeover."""
        if holder is None:
            return
        me = this_process()
        if holder.host == me.host:
            if holder.pid == me.pid:
                return
            if pid_alive(holder.pid, holder.started):
                raise RunLockedError(self._refusal(holder, checked=True))
        elif not (holder.job and holder.job == me.job):
            raise RunLockedError(self._refusal(holder, checked=False))
        if holder.job and holder.job == me.job:
            logger.info("%s: taking over the lock of this Slurm job's previous attempt (%s)", self.path,
                        holder.describe())
        else:
            logger.warning("%s was left by %s, which no longer runs: taking it over", self.path, holder.describe())

    def _refusal(self, holder: Holder | None, checked: bool) -> str:
        who = holder.describe() if holder else "another process (it is writing its name)"
        text = f"run folder {self.path.parent} is in use by {who}: wait for it to end or choose another run name"
        if not checked:
            text += f"; that host cannot be checked from here: if no such process runs, delete {self.path}"
        return text

    @staticmethod
    def _write(fd: int, holder: Holder) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and drop the flock (idempotent; also run at interpreter exit)."""
        if self._fd is None:
            return
        atexit.unregister(self.release)
        self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing drops the flock, after the unlink: a waiter then finds a new file
        self._fd = None
        if _held.get(self.path) is self:
            del _held[self.path]

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_folder(run_dir: str | Path, is_main: bool = True) -> RunLock | None:
    """Lock `run_dir` for a job of one or more processes: the main one takes the lock and every process learns the
    outcome (all raise RunLockedError when it is held); the others get None. Call it on every rank."""
    error, lock = None, None
    if is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as err:
            error = str(err)
    from dinoforge.launch import is_distributed  # torch: only for a job of several processes

    if is_distributed():
        import torch.distributed as dist

        message = [error]
        dist.broadcast_object_list(message, src=0)
        error = message[0]
    if error:
        raise RunLockedError(error)
    return lock
