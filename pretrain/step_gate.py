"""Holding a run before a step until a test lets it go (`step_gate_dir`): interruptions at a known step.

A test that requeues or preempts a job "after a few checkpoints" races the machine: on a fast or idle machine the job
has run out of steps before the signal, on a slow one it has not reached the checkpoint yet. With a gate folder the
test decides instead: before step s the run waits while `DIR/hold_<s>` exists, having written `DIR/at_<s>` (the main
process) to say so. The checkpoint of step s, if the run saves one, is complete by then. A requeued run reaching the
same gate writes `at_<s>` again, which tells the test that the earlier attempt is gone.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def hold_path(gate_dir: str | Path, step: int) -> Path:
    return Path(gate_dir) / f"hold_{step}"


def at_path(gate_dir: str | Path, step: int) -> Path:
    return Path(gate_dir) / f"at_{step}"


def wait_at_gate(gate_dir: str, step: int, is_main: bool, poll_s: float = 0.05) -> None:
    """Before `step`: while `gate_dir/hold_<step>` exists, wait (no gate folder: return at once)."""
    if not gate_dir or not hold_path(gate_dir, step).exists():
        return
    if is_main:
        at_path(gate_dir, step).write_text(f"{os.getpid()}\n")
    logger.info("step %d: held until %s is removed", step, hold_path(gate_dir, step))
    while hold_path(gate_dir, step).exists():
        time.sleep(poll_s)  # signals (USR2, TERM) still reach their handlers between sleeps
