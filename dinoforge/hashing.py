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


def path_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes or, for a folder (links resolved), of its files' relative names and digests in
    name order: a partitioned Parquet dataset hashes the same wherever it lies, and changes when any file does."""
    path = Path(path).resolve()
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()
