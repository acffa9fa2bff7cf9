"""Readers for image sources: folders, tar files, WebDataset shards and file lists of local paths.

Layout detection, file-list parsing, the tar member loop and the WebDataset key grouper are the shared ones of
`dinoforge.data`; what curate adds is that every entry becomes a row. Every reader yields one `RawInput` per input
sample, in a deterministic order, with the sample's bytes or a
`reject_reason` when the bytes cannot be read safely (unreadable file or tar member, a member path escaping the tar,
links, oversize files, a truncated archive). Readers never raise on bad inputs; a missing or unrecognisable source is
a configuration error and raises `SourceError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from curate.errors import CurateError
from dinoforge.data.dataset_spec import detect_layout, shard_paths
from dinoforge.data.errors import DatasetError
from dinoforge.data.file_list import read_file_list
from dinoforge.data.tar_reader import TarDamage, TarMember, iter_tar_members
from dinoforge.data.tar_samples import StrayMember, TarSample, group_samples

SOURCE_KINDS = ("auto", "folder", "tar", "webdataset", "filelist")
# Which symbolic links a source's reader follows: "inside" those that resolve inside the source folder, "all", "none".
LINK_POLICIES = ("inside", "all", "none")
# The shared layout detection's names -> curate's reader kinds ("tar": every member is an input of its own).
KIND_OF_LAYOUT = {"folder": "folder", "tar": "tar", "filelist": "filelist", "shards": "webdataset"}


class SourceError(CurateError, ValueError):
    """A configured source cannot be read at all (missing path, unknown kind, not a file list) or holds nothing."""


@dataclass
class RawInput:
    """One input sample as read from its source, before any decoding."""

    source: str  # source name (unique across the run)
    locator: str  # where the sample lives inside its source (relative path, tar member, shard/key)
    file: str  # filesystem path holding the bytes: the image file itself, or the tar containing it
    member: str | None = None  # tar member name, for samples inside tars
    offset: int | None = None  # byte offset of the member's data in an uncompressed tar (random access later)
    data: bytes | None = None
    reject_reason: str | None = None


def make_uid(source: str, locator: str) -> str:
    """Stable sample id: 96 bits of blake2b over (source name, locator).

    Derived from names, not bytes, so exact copies keep distinct ids; 96 bits keep the chance of any collision
    among 10^9 samples below 10^-10.
    """
    return hashlib.blake2b(f"{source}\x00{locator}".encode(), digest_size=12).hexdigest()


def guess_kind(path: str) -> str:
    """The reader kind for a source path when its config says `auto` (`dinoforge.data.dataset_spec.detect_layout`)."""
    if not Path(path).exists() and "{" not in path:
        raise SourceError(f"source path {path!r} does not exist (relative paths start at the working directory "
                          f"{os.getcwd()})")
    try:
        return KIND_OF_LAYOUT[detect_layout(path)]
    except (DatasetError, FileNotFoundError) as err:
        raise SourceError(f"cannot guess the kind of source {path!r} ({err}): set `kind` to one of folder, tar, "
                          "webdataset, filelist") from None


def read_source(path: str, kind: str, name: str, max_bytes: int, follow_symlinks: str = "inside"
                ) -> Iterator[RawInput]:
    """Dispatch to the reader of `kind` (resolving `auto`); `follow_symlinks` is one of `LINK_POLICIES`."""
    if kind not in SOURCE_KINDS:
        raise SourceError(f"source {name!r}: unknown kind {kind!r}; use one of {', '.join(SOURCE_KINDS)}")
    if follow_symlinks not in LINK_POLICIES:
        raise SourceError(f"source {name!r}: follow_symlinks={follow_symlinks!r}; use one of "
                          f"{', '.join(LINK_POLICIES)}")
    if kind == "auto":
        kind = guess_kind(path)
    if kind == "folder":
        return read_folder(path, name, max_bytes, follow_symlinks)
    if kind == "filelist":
        return read_filelist(path, name, max_bytes, follow_symlinks)
    return {"tar": read_tar, "webdataset": read_webdataset}[kind](path, name, max_bytes)  # members: never links


def link_problem(link: Path, root: str, follow_symlinks: str) -> str | None:
    """Why the symbolic link `link` under the source folder `root` (a real path) is not followed, or None.

    A link is followed wherever it points only with "all": by default one that resolves outside the source is a
    rejected row, unread, so a link to /etc/passwd puts none of its bytes in the manifest or report and a link to /
    does not walk the whole file system.
    """
    if follow_symlinks == "all":
        return None
    if follow_symlinks == "none":
        return f"symbolic link, not followed (follow_symlinks: none): {link}"
    target = os.path.realpath(link)
    if os.path.exists(target) and os.path.commonpath([root, target]) != root:  # a broken link says so when read
        return f"link leaves the source: {link} -> {target} (follow_symlinks: all on this source reads it)"
    return None


def read_folder(root: str, name: str, max_bytes: int, follow_symlinks: str = "inside") -> Iterator[RawInput]:
    """Every file under `root`, recursively, in sorted order.

    Symbolic links, to files and to folders alike, are followed under `follow_symlinks` (`link_problem`: by default
    those that stay inside `root`; pools assembled from links elsewhere set "all"); a link not followed is a rejected
    row. A folder reached a second time (a link loop, or two links to one folder) is one rejected row instead, so the
    walk ends and every entry still has its row. A broken link, or a folder that cannot be listed, is a rejected row
    too.
    Hidden entries (names starting with '.': .DS_Store, editor swap files, .git) are rejected rows, not read: a
    hidden folder is one row, so nothing under `root` goes unaccounted for.
    """
    base = Path(root)
    if not base.is_dir():
        raise SourceError(f"source {name!r}: folder {root!r} does not exist or is not a directory")
    real_root = os.path.realpath(base)
    visited = {real_root}
    unlisted: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(base, onerror=unlisted.append, followlinks=True):
        yield from _unlisted_rows(unlisted, base, name)
        folder = Path(dirpath)
        rejected = {d: f"hidden folder (name starts with '.'): {folder / d}" for d in dirnames if d.startswith(".")}
        for entry in sorted({*dirnames, *filenames} - set(rejected)):
            if not entry.startswith(".") and (folder / entry).is_symlink():
                if problem := link_problem(folder / entry, real_root, follow_symlinks):
                    rejected[entry] = problem
        for d in sorted(set(dirnames) - set(rejected)):
            target = os.path.realpath(folder / d)
            if target in visited:
                rejected[d] = f"link to a folder read already ({folder / d} -> {target}): a link loop or a second link"
            visited.add(target)
        dirnames[:] = sorted(set(dirnames) - set(rejected))
        for entry in sorted({*filenames, *rejected}):
            full = folder / entry
            locator = full.relative_to(base).as_posix()
            if entry in rejected:
                yield RawInput(name, locator, str(full.absolute()), reject_reason=rejected[entry])
            elif entry.startswith("."):
                yield RawInput(name, locator, str(full.absolute()), reject_reason=f"hidden file (name starts with "
                               f"'.'): {full}")
            else:
                yield _read_file(full, name, locator, max_bytes)
    yield from _unlisted_rows(unlisted, base, name)


def _unlisted_rows(errors: list[OSError], base: Path, name: str) -> Iterator[RawInput]:
    """One rejected row per folder that os.walk could not list (it would skip them silently)."""
    for err in errors:
        full = Path(err.filename)
        yield RawInput(name, full.relative_to(base).as_posix(), str(full.absolute()),
                       reject_reason=f"unreadable folder: {err.strerror or err}")
    errors.clear()


def read_filelist(list_path: str, name: str, max_bytes: int, follow_symlinks: str = "inside") -> Iterator[RawInput]:
    """The files a file list names (`dinoforge.data.file_list`; labels are not used here); locator = the path as
    written. A list names its files wherever they are, so a listed link is followed unless `follow_symlinks` is
    "none"."""
    if not Path(list_path).is_file():
        raise SourceError(f"source {name!r}: file list {list_path!r} does not exist or is not a file")
    try:
        entries = read_file_list(list_path)
    except DatasetError as err:
        raise SourceError(f"source {name!r}: {err}") from None
    for entry in entries:
        if follow_symlinks == "none" and entry.path.is_symlink():  # a list has no source folder to stay inside
            yield RawInput(name, entry.entry, str(entry.path.absolute()),
                           reject_reason=link_problem(entry.path, "", follow_symlinks))
        else:
            yield _read_file(entry.path, name, entry.entry, max_bytes)


def read_tar(tar_path: str, name: str, max_bytes: int) -> Iterator[RawInput]:
    """Every member of a tar file (any compression) except folders; locator = member name."""
    _check_tar_file(tar_path, name)
    for item in iter_tar_members(tar_path, max_bytes=max_bytes):
        if isinstance(item, TarDamage):
            yield _damage_row(item, name, tar_path, "")
        else:
            yield _member_row(item, name, tar_path, item.name)


def read_webdataset(spec: str, name: str, max_bytes: int) -> Iterator[RawInput]:
    """Samples of WebDataset shards: a brace pattern, a glob, a folder of `*.tar`, or one tar.

    Samples are the shared key grouper's (`dinoforge.data.tar_samples`); a sample's row holds its image member.
    Locator = "<shard file name>/<key>"; a member that belongs to no sample is a rejected row of its own
    ("<shard file name>/<member>").
    """
    for shard in expand_shards(spec, name):
        _check_tar_file(shard, name)
        prefix = f"{Path(shard).name}/"
        for item in group_samples(iter_tar_members(shard, max_bytes=max_bytes)):
            if isinstance(item, TarDamage):
                yield _damage_row(item, name, shard, prefix)
            elif isinstance(item, StrayMember):
                row = _member_row(item.member, name, shard, prefix + item.member.name)
                yield replace(row, data=None, reject_reason=item.reason)
            else:
                yield _sample_row(item, name, shard, prefix + item.key)


def expand_shards(spec: str, name: str) -> list[str]:
    """Shard paths named by a brace pattern, glob, folder of tars, curate shard index, or a single tar."""
    try:
        return shard_paths(spec)
    except (DatasetError, FileNotFoundError) as err:
        raise SourceError(f"source {name!r}: {err}") from None


def _check_tar_file(tar_path: str, name: str) -> None:
    if not Path(tar_path).is_file():
        raise SourceError(f"source {name!r}: tar file {tar_path!r} does not exist or is not a file")


def _member_row(member: TarMember, name: str, tar_path: str, locator: str) -> RawInput:
    return RawInput(name, locator, str(Path(tar_path)), member.name, member.offset, member.data, member.reject_reason)


def _sample_row(sample: TarSample, name: str, tar_path: str, locator: str) -> RawInput:
    """The row of a sample: its image member, or (no usable image) its first member with the reason."""
    image_ext = sample.image_ext()
    if image_ext is not None:
        return _member_row(sample.members[image_ext], name, tar_path, locator)
    first = next(iter(sample.members.values()))
    return RawInput(name, locator, str(Path(tar_path)), first.name, None, None, sample.reject_reason())


def _damage_row(damage: TarDamage, name: str, tar_path: str, prefix: str) -> RawInput:
    """The one row standing for what an unreadable or damaged archive still held (the uid comes from the locator,
    so it names the damage's place, not its message)."""
    where = f"<truncated after {damage.members_read} members>" if damage.opened else "<archive>"
    return RawInput(name, prefix + where, str(Path(tar_path)), reject_reason=damage.reason)


def _read_file(path: Path, name: str, locator: str, max_bytes: int) -> RawInput:
    raw = RawInput(name, locator, str(path.absolute()))
    try:
        if not path.exists():
            raw.reject_reason = ("broken symlink" if path.is_symlink() else "file not found") + f": {path}"
        elif not path.is_file():
            raw.reject_reason = f"not a regular file: {path}"
        elif path.stat().st_size > max_bytes:
            raw.reject_reason = f"file too large: {path.stat().st_size} bytes > limit {max_bytes}"
        else:
            raw.data = path.read_bytes()
    except OSError as err:
        raw.reject_reason = f"unreadable file: {type(err).__name__}: {err.strerror or err}"
    return raw
