"""Stable partitioning of samples by uid, so the same sample lands in the same Slurm array task on every rerun."""

from __future__ import annotations

import hashlib


def partition_of(uid: str, n_partitions: int) -> int:
    """The partition (0..n_partitions-1) of `uid`.

    blake2b rather than Python's `hash()`: the latter is salted per process (PYTHONHASHSEED), so two array tasks
    would disagree about who owns a sample.
    """
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be >= 1, got {n_partitions}")
    digest = hashlib.blake2b(uid.encode("utf-8"), digest_size=8, person=b"dinoforge-part").digest()
    return int.from_bytes(digest, "little") % n_partitions


def parse_partition_list(spec: str, n_partitions: int) -> list[int]:
    """Partitions named on the command line: "3", "0-7", "1,4,9-11" (inclusive ranges)."""
    chosen: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(lo), int(lo))
        except ValueError:
            raise ValueError(f"bad partition list {spec!r}: use e.g. '3', '0-7' or '1,4,9-11'") from None
        if not 0 <= first <= last < n_partitions:
            raise ValueError(f"partition range {part!r} is outside 0..{n_partitions - 1} (partitions={n_partitions})")
        chosen.update(range(first, last + 1))
    if not chosen:
        raise ValueError(f"partition list {spec!r} names no partition")
    return sorted(chosen)
