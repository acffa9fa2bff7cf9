"""Timing shared by the bench scripts."""

from __future__ import annotations

import time


class Clock:
    """Wall and process CPU seconds since creation (CPU time is steadier on a machine shared with other jobs)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu
