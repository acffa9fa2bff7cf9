"""Atomic file replacement: write beside the target under a name unique to this process, fsync, rename.

A reader (or a rerun after a crash) sees the old file or the new one, never half of one. The temporary name holds
the process id because Slurm array tasks may write the same shared file (the last task to finish a step writes
its marker) at the same moment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling for writers that need a file name (safetensors, parquet), renamed onto `path` when the
    block ends without an error and removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Replace `path` with what `write(file)` writes into a fresh binary file, synced to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, doc: Any, indent: int | None = 1) -> Path:
    """JSON with sorted keys (identical documents give identical bytes)."""
    return atomic_write_text(path, json.dumps(doc, indent=indent, sort_keys=True, default=str))
