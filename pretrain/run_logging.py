"""Python logging of a run: rank 0 to the console, every rank to `logs/rank<R>.log`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s"


def setup_logging(run_dir: str | Path, rank: int, level: int = logging.INFO) -> None:
    """Idempotent: replaces the handlers this function installed before."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in [h for h in root.handlers if getattr(h, "_dinoforge", False)]:
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT.format(rank=rank))
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(log_dir / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._dinoforge = True  # type: ignore[attr-defined]
        root.addHandler(handler)
