"""A checkpoint's integrity manifest: every file of a DCP directory with its size and SHA-256, checked before loading.

A truncated shard or an overwritten `.metadata` otherwise surfaces deep inside DCP as an `UnpicklingError` or
"PytorchStreamReader failed reading zip archive", with no word about which file or what to do. The manifest
(`integrity.json` inside the checkpoint) is written when the checkpoint is published:

- sizes at once (a directory listing: free at any scale);
- SHA-256 in a background thread (a ViT-g checkpoint with its optimizer is tens of GB: hashing must not stall the
  training step), the manifest rewritten atomically once the hashes are known.

Checking costs little too: every size always, and the hashes of files up to `HASH_CHECK_MAX_BYTES` (`.metadata`,
small shards); `full=True` hashes every file.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from dinoforge.atomic import atomic_write_json
from dinoforge.errors import CheckpointError
from dinoforge.hashing import file_sha256

logger = logging.getLogger(__name__)

MANIFEST = "integrity.json"
FORMAT = "dinoforge-checkpoint-manifest-1"
HASH_CHECK_MAX_BYTES = 64 << 20  # larger files are checked by size when loading (reading them twice costs minutes)


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files differ from its manifest (truncated, overwritten, missing) or cannot be read."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path  # the damaged file (or the checkpoint directory when no single file is to blame)


@dataclass(frozen=True)
class DamagedCheckpoint:
    """A checkpoint passed over by resume: which step, which file, what is wrong (for the log and metrics.jsonl)."""

    step: int
    path: Path
    problem: str

    def as_note(self) -> dict[str, str]:
        return {"damaged_checkpoint": str(self.path), "damaged_checkpoint_step": str(self.step),
                "damaged_checkpoint_problem": self.problem}


def _data_files(directory: Path) -> list[Path]:
    """The checkpoint's own files: everything but the manifest and half-written temporaries."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST and ".tmp" not in p.name)


def write_sizes(directory: Path) -> dict:
    """Write the manifest with every file's size (no hashes yet); returns it."""
    manifest = {"format": FORMAT, "files": {p.name: {"size": p.stat().st_size} for p in _data_files(directory)}}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def add_hashes(directory: Path, manifest: dict) -> None:
    """Hash every file of `manifest` and rewrite it with the hashes (a pruned or replaced directory: nothing)."""
    try:
        for name, entry in manifest["files"].items():
            entry["sha256"] = file_sha256(directory / name)
        atomic_write_json(directory / MANIFEST, manifest)
    except FileNotFoundError:  # the checkpoint was pruned or replaced meanwhile
        return
    logger.debug("hashed the %d files of %s", len(manifest["files"]), directory)


def hash_in_background(directory: Path, manifest: dict) -> threading.Thread:
    """`add_hashes` in a thread (not a daemon: a finishing run waits for it rather than leaving sizes only)."""
    thread = threading.Thread(target=add_hashes, args=(directory, manifest), name=f"hash-{directory.name}")
    thread.start()
    return thread


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a checkpoint; None for checkpoints written before manifests existed."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError("unknown format")
    except (ValueError, OSError, AttributeError) as err:
        raise DamagedCheckpointError(f"checkpoint manifest {path} is unreadable ({err}); the checkpoint cannot be "
                                     "checked: resume from another step, or delete the directory", path) from None
    return manifest


def verify(directory: Path, full: bool = False) -> None:
    """Raise DamagedCheckpointError naming the first file that differs from the manifest (no manifest: no check)."""
    manifest = read_manifest(directory)
    if manifest is None:
        logger.info("%s has no %s (written before manifests): not checked", directory, MANIFEST)
        return
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise DamagedCheckpointError(f"checkpoint file {path} is missing", path)
        size = path.stat().st_size
        if size != entry["size"]:
            raise DamagedCheckpointError(f"checkpoint file {path} is {size} bytes, {entry['size']} when it was "
                                         "written (truncated or overwritten)", path)
        expected = entry.get("sha256")  # absent while the publishing run was still hashing (or was killed)
        if expected and (full or size <= HASH_CHECK_MAX_BYTES) and file_sha256(path) != expected:
            raise DamagedCheckpointError(f"checkpoint file {path} differs from its SHA-256 when it was written "
                                         "(overwritten or corrupted)", path)
