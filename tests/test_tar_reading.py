"""The one tar member loop (`dinoforge.data.tar_reader`) and the one WebDataset key grouper
(`dinoforge.data.tar_samples`) that curation's ingest, the random-access shard scan and the training stream share:
one test per rule, on small tars written here."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from test_data_fixtures import write_tar

from dinoforge.data.tar_reader import TarDamage, TarMember, iter_tar_members, read_span
from dinoforge.data.tar_samples import METADATA, NO_EXTENSION, StrayMember, TarSample, group_samples


def members(*names: str) -> list[TarMember]:
    return [TarMember(name, 1, None, b"x") for name in names]


def test_every_member_in_order_with_its_data_and_offset(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "a.tar", [("k0.jpg", b"zero"), ("d/k1.png", b"one!")])
    with tarfile.open(path, "a") as tar:
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # folders are not members of any sample: skipped, not counted
    found = list(iter_tar_members(path))
    assert [(m.name, m.data, m.reject_reason) for m in found] == [("k0.jpg", b"zero", None),
                                                                  ("d/k1.png", b"one!", None)]
    with open(path, "rb") as fh:
        assert [read_span(fh, m.offset, m.size) for m in found] == [b"zero", b"one!"]


def test_headers_only_reads_no_data(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "a.tar", [("k0.jpg", b"zero")])
    (member,) = iter_tar_members(path, read_data=False)
    assert member.data is None and member.reject_reason is None and member.size == 4


def test_a_compressed_tar_has_no_offsets(tmp_path: Path) -> None:
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("k0.jpg")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"zero"))
    (member,) = iter_tar_members(path)
    assert member.data == b"zero" and member.offset is None


def test_a_truncated_tail_keeps_the_members_before_it(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "t.tar", [(f"k{i}.jpg", bytes([65 + i]) * 600) for i in range(3)])
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"C" * 600) + 100])  # k2's header survives, its data does not
    *kept, cut, damage = iter_tar_members(path)
    assert [(m.name, m.data) for m in kept] == [("k0.jpg", b"A" * 600), ("k1.jpg", b"B" * 600)]
    assert cut.name == "k2.jpg" and cut.data is None and cut.reject_reason.startswith("unreadable tar member")
    assert damage == TarDamage("tar truncated or corrupt after 3 member(s): unexpected end of data", 3, opened=True)


def test_an_archive_that_does_not_open_is_one_damage_record(tmp_path: Path) -> None:
    path = tmp_path / "garbage.tar"
    path.write_bytes(b"\x00garbage" * 300)
    (damage,) = iter_tar_members(path)
    assert isinstance(damage, TarDamage) and not damage.opened and damage.members_read == 0
    assert damage.reason.startswith("unreadable tar archive: ReadError")


def test_unsafe_members_are_records_with_their_reason(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "u.tar", [("../escape.jpg", b"x"), ("big.jpg", b"y" * 100)])
    with tarfile.open(path, "a") as tar:
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    reasons = {m.name: m.reject_reason for m in iter_tar_members(path, max_bytes=10)}
    assert reasons["../escape.jpg"].startswith("path escapes the tar")
    assert reasons["big.jpg"] == "file too large: 100 bytes > limit 10"
    assert reasons["link.jpg"].startswith("tar member is a link")


def test_read_span_refuses_a_short_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    with open(path, "rb") as fh, pytest.raises(OSError, match="expected 5 bytes at offset 1, got 2"):
        read_span(fh, 1, 5)


def test_a_key_with_several_members_is_one_sample() -> None:
    (sample,) = group_samples(members("d/k.jpg", "d/k.json", "d/k.seg.png"))
    assert sample.key == "d/k" and list(sample.members) == ["jpg", "json", "seg.png"]
    assert (sample.image_ext(), sample.label_ext(), sample.reject_reason()) == ("jpg", "json", None)


def test_samples_are_runs_of_consecutive_keys_in_order() -> None:
    keys = [s.key for s in group_samples(members("a.jpg", "a.cls", "b.jpg", "c.png", "c.json"))]
    assert keys == ["a", "b", "c"]


def test_a_member_without_an_extension_is_keyed_by_its_whole_name() -> None:
    (joined,) = group_samples(members("k.jpg", "k"))  # next to its key's members: one of them
    assert list(joined.members) == ["jpg", ""] and joined.reject_reason() is None
    (alone,) = group_samples(members("README"))
    assert alone.key == "README" and alone.reject_reason() == NO_EXTENSION
    (mixed,) = group_samples(members("m", "m.json"))
    assert mixed.reject_reason() == "sample has no image member (members: <none>, json)"


def test_webdataset_metadata_is_a_stray() -> None:
    (stray,) = group_samples(members("__index__"))
    assert stray.reason == METADATA


def test_a_second_member_with_the_same_extension_is_a_stray() -> None:
    first, again = members("x.JPEG", "x.jpeg")
    out = list(group_samples([first, again]))
    assert out == [StrayMember(again, "duplicate member .jpeg for key 'x'"), TarSample("x", {"jpeg": first})]


def test_a_key_appearing_again_after_other_samples_is_a_stray() -> None:
    out = list(group_samples(members("a.jpg", "b.jpg", "a.json")))
    assert [type(o).__name__ for o in out] == ["TarSample", "TarSample", "StrayMember"]
    assert out[2].member.name == "a.json" and "appears again" in out[2].reason


def test_damage_passes_through_after_the_sample_before_it() -> None:
    damage = TarDamage("tar truncated or corrupt after 1 member(s): boom", 1, opened=True)
    out = list(group_samples([*members("a.jpg"), damage]))
    assert [type(o).__name__ for o in out] == ["TarSample", "TarDamage"] and out[1] is damage


def test_a_sample_without_a_usable_image_says_why() -> None:
    bad_image = TarMember("k.jpg", 1, None, None, "tar member is a link (to '/etc/passwd'), not a regular file")
    (linked,) = group_samples([bad_image, *members("k.json")])
    assert linked.image_ext() is None and linked.reject_reason() == bad_image.reject_reason
    (no_image,) = group_samples(members("m.json", "m.cls"))
    assert no_image.reject_reason() == "sample has no image member (members: cls, json)"
    (fallback,) = group_samples([bad_image, *members("k.png")])  # a usable image of another format is taken
    assert fallback.image_ext() == "png" and fallback.reject_reason() is None
