"""The one WebDataset key grouper: a tar's members -> samples, with every member that fits no sample as a record.

A WebDataset sample is a run of consecutive members sharing a key (`dir/key.ext`: the member path up to the first dot
of its basename, `dinoforge.data.tar_members.split_key`). `group_samples` turns the records of
`dinoforge.data.tar_reader.iter_tar_members` into `TarSample`s, and yields what belongs to no sample as a
`StrayMember` with its reason instead of dropping it: webdataset's own metadata (`__index__`...), a second member with
a sample's extension, a key appearing again after other samples. Keys stay unique within a tar, so a sample's key
(and curation's row for it) is never two things. A member without an extension has its whole name as key and an
empty extension: next to its key's other members it joins them, alone it is a sample that says why it is unusable.
A `TarDamage` passes through after the sample before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from dinoforge.data.formats import image_member, label_member
from dinoforge.data.tar_members import is_webdataset_metadata, split_key
from dinoforge.data.tar_reader import TarDamage, TarMember

NO_EXTENSION = "member name has no extension, so it belongs to no sample"
METADATA = "webdataset metadata member, not a sample"


@dataclass
class TarSample:
    """The members of one key, by extension (lowercased), in archive order; rejected members included."""

    key: str
    members: dict[str, TarMember] = field(default_factory=dict)

    def usable(self) -> dict[str, TarMember]:
        """The members that may be read (no `reject_reason`)."""
        return {ext: m for ext, m in self.members.items() if m.reject_reason is None}

    def image_ext(self) -> str | None:
        """The extension of the usable member holding the image (`dinoforge.data.formats.image_member`), or None."""
        return image_member(self.usable())

    def label_ext(self) -> str | None:
        """The extension of the usable member holding the label, or None."""
        return label_member(self.usable())

    def reject_reason(self) -> str | None:
        """Why the sample has no usable image: its first rejected member's reason, else the members it has."""
        if self.image_ext() is not None:
            return None
        rejected = [m.reject_reason for m in self.members.values() if m.reject_reason]
        if rejected:
            return rejected[0]
        if list(self.members) == [""]:
            return NO_EXTENSION
        return f"sample has no image member (members: {', '.join(e or '<none>' for e in sorted(self.members))})"


@dataclass(frozen=True)
class StrayMember:
    """A member that belongs to no sample, and why."""

    member: TarMember
    reason: str


def group_samples(items: Iterable[TarMember | TarDamage]) -> Iterator[TarSample | StrayMember | TarDamage]:
    """Group consecutive members by key into samples, in archive order (see the module doc for the strays)."""
    current: TarSample | None = None
    finished: set[str] = set()
    for item in items:
        if isinstance(item, TarDamage):
            if current is not None:
                yield current
                current = None
            yield item
            continue
        if is_webdataset_metadata(item.name):
            yield StrayMember(item, item.reject_reason or METADATA)
            continue
        key, ext = split_key(item.name) or (item.name, "")
        if current is not None and key != current.key:
            finished.add(current.key)
            yield current
            current = None
        if key in finished:
            yield StrayMember(item, f"key {key!r} appears again after other samples (a sample's members must be "
                                    "consecutive)")
        elif current is None:
            current = TarSample(key, {ext: item})
        elif ext in current.members:
            yield StrayMember(item, f"duplicate member .{ext} for key {key!r}")
        else:
            current.members[ext] = item
    if current is not None:
        yield current
