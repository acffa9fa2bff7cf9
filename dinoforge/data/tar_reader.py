"""The one loop over a tar's members: every member as a record, damage included, never an exception.

Every reader of tars (curation's ingest, the random-access shard scan, the training stream) walks archives with
`iter_tar_members`. Untrusted archives break in a few ways, and each becomes data the caller can count or record:
- a member that must not be read (unsafe name, link, not a regular file, over `max_bytes`:
  `dinoforge.data.tar_members.member_problem`) or whose data is cut short is a `TarMember` with a `reject_reason`;
- an archive that cannot be opened, or whose tail is truncated or corrupt, ends with one `TarDamage`: the members
  before the damage keep their records, so a shard cut in its last sample still yields its other samples.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dinoforge.data.tar_members import member_problem

# gzip, bzip2 and xz magic numbers: a compressed tar has no byte offsets to seek to.
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


@dataclass(frozen=True)
class TarMember:
    """One member of a tar (folders are skipped): its name, where its data lies, its data, or why it is unusable."""

    name: str
    size: int
    offset: int | None  # byte offset of the data in an uncompressed tar (re-read by seeking); None when compressed
    data: bytes | None = None  # with read_data, unless rejected
    reject_reason: str | None = None


@dataclass(frozen=True)
class TarDamage:
    """The rest of an archive is lost: it could not be opened (`opened` False), or broke after `members_read`."""

    reason: str
    members_read: int
    opened: bool


def iter_tar_members(path: str | Path, read_data: bool = True, max_bytes: int | None = None
                     ) -> Iterator[TarMember | TarDamage]:
    """Every non-folder member of the tar at `path` (any compression), in archive order, then a `TarDamage` if the
    archive is unreadable or damaged. `read_data=False` reads headers only (data is skipped by seeking)."""
    offsets = not is_compressed(path)
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as err:
        yield TarDamage(f"unreadable tar archive: {type(err).__name__}: {err}", 0, opened=False)
        return
    count = 0
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError) as err:
                yield TarDamage(f"tar truncated or corrupt after {count} member(s): {err}", count, opened=True)
                return
            if info is None:
                return
            if info.isdir():
                continue
            count += 1
            yield _member(tar, info, offsets, read_data, max_bytes)


def _member(tar: tarfile.TarFile, info: tarfile.TarInfo, offsets: bool, read_data: bool,
            max_bytes: int | None) -> TarMember:
    offset = info.offset_data if offsets else None
    reason = member_problem(info, max_bytes)
    if reason is not None or not read_data:
        return TarMember(info.name, info.size, offset, None, reason)
    try:
        handle = tar.extractfile(info)
        data = handle.read() if handle is not None else None
        if data is None or len(data) != info.size:  # tarfile returns what is left of a member cut short
            raise EOFError(f"read {0 if data is None else len(data)} of {info.size} bytes")
    except (tarfile.TarError, OSError, EOFError) as err:
        return TarMember(info.name, info.size, offset, None, f"unreadable tar member: {type(err).__name__}: {err}")
    return TarMember(info.name, info.size, offset, data)


def is_compressed(path: str | Path) -> bool:
    """Whether the file at `path` starts like a gzip, bzip2 or xz stream (an unreadable file counts as plain)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(6).startswith(COMPRESSED_MAGIC)
    except OSError:
        return False


def read_span(file: BinaryIO, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of an open file (a member's data in an uncompressed tar); a short read is an
    OSError (the file changed or was truncated since it was scanned)."""
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise OSError(f"{getattr(file, 'name', 'file')}: expected {size} bytes at offset {offset}, got {len(data)} "
                      "(truncated or changed since it was scanned?)")
    return data
