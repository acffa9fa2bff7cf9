"""A real single-node Slurm on localhost: munged, slurmctld and slurmd with their config in one directory.

It exists so that the launcher is tested against the real scheduler (sbatch, srun, arrays, dependencies, requeue)
rather than a mock. Everything lives under `root` (key, sockets, state, spool, logs, pid files) and the daemons
listen on free non-default ports, so a system munge or Slurm on the same machine is left alone. Clients find the
cluster through `SLURM_CONF` (see `LocalCluster.env`). Needs root (slurmd starts jobs as their users) and the
Debian packages `slurm-wlm` and `munge` (`make system-deps`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
NODE = "localhost"
DEFAULT_ROOT = Path(os.environ.get("DINOFORGE_SLURM_DIR")
                    or Path(tempfile.gettempdir()) / f"dinoforge-slurm-{os.getuid()}")
MUNGE_KEY_BYTES = 1024
CRED_EXPIRE_S = 10  # slurm_cred.c rejects values under 5


class LocalClusterError(RuntimeError):
    """The local cluster cannot be started here, or a daemon failed; the message says why (with its log tail)."""


def missing_requirements() -> str | None:
    """Why a local cluster cannot start on this machine (None when it can)."""
    if os.getuid() != 0:
        return "not root: slurmd must run as root to start jobs (run the tests as root, or use a real cluster)"
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if missing:
        return f"packages missing: {', '.join(missing)} not found; install them with `make system-deps` " \
               "(apt-get install slurm-wlm munge)"
    return None


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def machine_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


def is_zombie(pid: int) -> bool:
    """Whether `pid` has exited and waits for its parent to reap it (state Z in /proc/PID/stat): a daemon that has
    stopped, although signal 0 still reaches it. Where the daemons' parent never reaps (a container whose init does
    not), this is all that is left of them."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no procfs (or gone in between): signal 0 has answered already
    # the command name, in parentheses, may itself hold spaces or parentheses: the state follows the last ')'
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def log_tail(path: Path, lines: int = 20) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class LocalCluster:
    """A single-node Slurm whose files all live under `root`."""

    root: Path = DEFAULT_ROOT

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, srun, submitit) needs in its environment to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _pid_file(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def _log(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    def _pid(self, daemon: str) -> int | None:
        try:
            pid = int(self._pid_file(daemon).read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return None if is_zombie(pid) else pid

    def running(self) -> dict[str, int | None]:
        """Each daemon's pid, or None when it is not running."""
        return {daemon: self._pid(daemon) for daemon in DAEMONS}

    def write_config(self, cpus: int | None = None, memory_mb: int | None = None) -> Path:
        """The munge key and slurm.conf for this machine (CPUs and memory from the machine unless given)."""
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses keys and directories that others may read or write
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.is_file():
            key.write_bytes(os.urandom(MUNGE_KEY_BYTES))
        os.chmod(key, 0o400)
        cpus = cpus or os.cpu_count() or 1
        memory_mb = memory_mb or max(1024, int(machine_memory_mb() * 0.9))
        ctld_port, slurmd_port = free_ports(2)
        lines = {
            "ClusterName": "dinoforge",
            "SlurmctldHost": NODE,
            "SlurmctldPort": ctld_port,
            "SlurmdPort": slurmd_port,
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            # cred_expire is also how long slurmctld holds a requeued job back (default 120 s): on one node the
            # credential of a step is checked within a second, and a preempted job should restart at once
            "AuthInfo": f"socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            "StateSaveLocation": self.root / "state",
            "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": self._pid_file("slurmctld"),
            "SlurmdPidFile": self._pid_file("slurmd"),
            "SlurmctldLogFile": self._log("slurmctld"),
            "SlurmdLogFile": self._log("slurmd"),
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "sched_interval=2",
            "MpiDefault": "none",
            "SwitchType": "switch/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "ReturnToService": 2,
            "SlurmctldTimeout": 30,
            "SlurmdTimeout": 60,
            "InactiveLimit": 0,
            "KillWait": 5,
            "MinJobAge": 3600,  # finished jobs stay visible to `scontrol show job` (there is no accounting: no sacct)
            "MessageTimeout": 20,
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        # On a small machine jobs share cores: a 2-task job and an array task may run side by side on 2 CPUs.
        text += f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN\n"
        text += f"PartitionName=local Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4\n"
        self.conf.write_text(text)
        return self.conf

    def start(self, timeout: float = 60.0) -> dict[str, str]:
        """Start the three daemons (reusing running ones) and wait until the node takes jobs; returns `env`."""
        reason = missing_requirements()
        if reason:
            raise LocalClusterError(reason)
        pids = self.running()
        if all(pids.values()):
            return self.env
        if any(pids.values()):
            self.stop()
        self.write_config()
        env = {**os.environ, **self.env}
        self._run_daemon("munged", ["munged", f"--socket={self.munge_socket}",
                                    f"--key-file={self.root / 'munge' / 'munge.key'}",
                                    f"--pid-file={self._pid_file('munged')}", f"--log-file={self._log('munged')}",
                                    f"--seed-file={self.root / 'munge' / 'munged.seed'}", "--force"], env)
        self._wait_for(lambda: self.munge_socket.exists(), "munged", timeout)
        # -c: a fresh controller state; -N: slurmd is the node named in slurm.conf whatever the machine's hostname
        self._run_daemon("slurmctld", ["slurmctld", "-c", "-f", str(self.conf)], env)
        self._wait_for(lambda: self._pid("slurmctld") is not None and self._ping(), "slurmctld", timeout)
        self._run_daemon("slurmd", ["slurmd", "-f", str(self.conf), "-N", NODE], env)
        self._wait_for(self._node_ready, "slurmd", timeout)
        return self.env

    def _run_daemon(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)  # each daemon forks into the background
        if result.returncode != 0:
            self.stop()
            raise LocalClusterError(f"{name} failed to start (exit {result.returncode}): {result.stderr.strip()}\n"
                                    f"--- {self._log(name)}:\n{log_tail(self._log(name))}")

    def _wait_for(self, ready, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        self.stop()
        raise LocalClusterError(f"{name} did not become ready within {timeout:.0f} s\n"
                                f"--- {self._log(name)}:\n{log_tail(self._log(name))}")

    def _client(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout)

    def _ping(self) -> bool:
        result = self._client("scontrol", "ping")
        return result.returncode == 0 and "UP" in result.stdout

    def _node_ready(self) -> bool:
        result = self._client("sinfo", "-h", "-N", "-n", NODE, "-o", "%T")
        return result.returncode == 0 and result.stdout.strip().rstrip("*") in ("idle", "mixed", "allocated")

    def status(self) -> str:
        """Which daemons run, and sinfo's view of the partition."""
        pids = self.running()
        lines = [f"{daemon}: {'running, pid ' + str(pid) if pid else 'stopped'}" for daemon, pid in pids.items()]
        if pids["slurmctld"]:
            result = self._client("sinfo")
            lines.append((result.stdout or result.stderr).rstrip())
            lines.append(f"export SLURM_CONF={self.conf}")
        return "\n".join(lines)

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (SIGTERM, then SIGKILL)."""
        if self._pid("slurmctld"):
            try:
                self._client("scancel", "--full", "--user=root", timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for daemon in reversed(DAEMONS):
            pid = self._pid(daemon)
            if pid is None:  # stopped already (or a zombie): only its pid file is left
                self._pid_file(daemon).unlink(missing_ok=True)
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._pid(daemon) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._pid(daemon) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._pid_file(daemon).unlink(missing_ok=True)
