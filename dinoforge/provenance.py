"""Which code made an artefact: the installed dinoforge version and the git commit of its source checkout."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """{"version": "0.1.0", "commit": "<sha>[-dirty]"}; commit "unknown" outside a git checkout (a wheel install)."""
    try:
        version = metadata.version("dinoforge")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "commit": _git_commit()}


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # tracked files only: run folders and caches beside the code do not make it "dirty"
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
