"""Python logging of a process: the console (rank 0 at the run's level, other ranks warnings only) and, when given,
a log file per process. One setup for every stage's command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"


def setup_logging(log_file: str | Path | None = None, rank: int = 0, level: int | str = logging.INFO) -> None:
    """Idempotent: replaces the handlers this function installed before.

    A log file that cannot be created (a finished run rerun from a read-only copy) leaves the console only, with a
    warning: a step that really has to write then fails with its own message."""
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    root = logging.getLogger()
    root.setLevel(level)
    for handler in [h for h in root.handlers if getattr(h, "_dinoforge", False)]:
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [console]
    problem = None
    if log_file is not None:
        log_file = Path(log_file)
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(log_file))
        except OSError as err:
            problem = f"cannot write the log file {log_file} ({err.strerror or err}); logging to the console only"
    formatter = logging.Formatter(FORMAT.format(rank=rank))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._dinoforge = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if problem:
        logging.getLogger(__name__).warning(problem)
