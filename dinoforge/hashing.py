"""Content hashes of files: the identity of weights, shards and inputs in manifests and caches."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """Hex sha256 of the file's bytes, read in chunks (weights files are gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
