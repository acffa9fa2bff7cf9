"""Tar member validation and WebDataset keys: which members may be read, and which sample each belongs to.

Archives are untrusted input: a member name must not escape the archive (absolute paths, `..`, backslashes, NUL
bytes) and only regular files are read (a link could point anywhere on the reading machine).
"""

from __future__ import annotations

import tarfile


def unsafe_name_reason(name: str) -> str | None:
    """Why a tar member name is unsafe to use, or None when it is fine."""
    if not name:
        return "empty member name"
    if "\x00" in name:
        return "member name contains a NUL byte"
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":") or ".." in name.split("/"):
        return f"path escapes the tar: {name!r}"
    return None


def member_problem(info: tarfile.TarInfo, max_bytes: int | None = None) -> str | None:
    """Why the tar member `info` must not be read (unsafe name, link, not a regular file, too large), or None."""
    reason = unsafe_name_reason(info.name)
    if reason is not None:
        return reason
    if info.issym() or info.islnk():
        return f"tar member is a link (to {info.linkname!r}), not a regular file"
    if not info.isfile():
        return "tar member is not a regular file (device, fifo or unknown type)"
    if max_bytes is not None and info.size > max_bytes:
        return f"file too large: {info.size} bytes > limit {max_bytes}"
    return None


def split_key(name: str) -> tuple[str, str] | None:
    """`dir/key.ext.more` -> (`dir/key`, `ext.more` lowercased); None when the basename has no extension."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{head}/{stem}" if head else stem), ext.lower()


def is_webdataset_metadata(name: str) -> bool:
    """webdataset's own top-level members (`__index__`...) that are not samples."""
    return "/" not in name and name.startswith("__") and name.endswith("__")
