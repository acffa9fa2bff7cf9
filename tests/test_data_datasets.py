"""build_dataset over every layout: ImageFolder, file lists, tar / brace / shard folders / curate output.

Each layout is built from the same real JPEGs, and must give the same pixels and labels as the ImageFolder; broken
files are substituted deterministically, counted (also across DataLoader workers) and logged with the file.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_fixtures import (
    broken_images,
    image_files,
    imagefolder_samples,
    imagenette_subset,
    jpeg_bytes,
    write_shards,
    write_tar,
)
from torch.utils.data import DataLoader

from dinoforge.data.datasets import DatasetError, build_dataset, detect_kind, split_kind_prefix
from dinoforge.data.shard_index import ShardEntry, write_index
from dinoforge.data.tar_members import split_key, unsafe_name_reason
from dinoforge.data.tar_shards import scan_shard


@pytest.fixture(scope="module")
def folder() -> Path:
    return imagenette_subset(per_class=4)


@pytest.fixture(scope="module")
def reference(folder: Path) -> list[tuple[np.ndarray, int]]:
    """(pixels, label) of every sample, decoded directly with PIL from the ImageFolder files."""
    classes = sorted(p.name for p in folder.iterdir())
    out = []
    for path in image_files(folder):
        with Image.open(path) as image:
            out.append((np.asarray(image.convert("RGB")), classes.index(path.parent.name)))
    return out


def assert_matches(dataset, reference: list[tuple[np.ndarray, int]]) -> None:
    assert len(dataset) == len(reference)
    for i in (0, 7, len(reference) - 1):
        image, label = dataset[i]
        np.testing.assert_array_equal(np.asarray(image), reference[i][0])
        assert label == reference[i][1]


def test_imagefolder_labels_classes_and_transform(folder: Path, reference) -> None:
    dataset = build_dataset(folder)
    assert dataset.source.kind == "imagefolder"
    assert dataset.classes == sorted(p.name for p in folder.iterdir()) and len(dataset.classes) == 10
    assert_matches(dataset, reference)
    assert dataset.source.targets == [label for _, label in reference]
    as_tensor = build_dataset(folder, transform=lambda im: torch.from_numpy(np.array(im)), with_labels=False)
    assert torch.equal(as_tensor[3], torch.from_numpy(reference[3][0].copy()))
    assert "40 images in 10 classes" in dataset.describe()
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_imagefolder_records_files_it_skips(tmp_path: Path, caplog) -> None:
    (tmp_path / "cat" / "sub").mkdir(parents=True)
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat" / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    (tmp_path / "cat" / "sub" / "b.PNG").write_bytes(jpeg_bytes(seed=2))  # wrong content type: found at read
    (tmp_path / "cat" / "notes.txt").write_text("hello")
    (tmp_path / "dog" / "c.jpeg").write_bytes(jpeg_bytes(seed=3))
    (tmp_path / "stray.jpg").write_bytes(jpeg_bytes(seed=4))
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(tmp_path)
    assert [Path(p).name for p in dataset.source.paths] == ["a.jpg", "b.PNG", "c.jpeg"]
    assert dataset.source.labels == [0, 0, 1]
    reasons = {Path(p).name: r for p, r in dataset.source.rejected}
    assert reasons == {"notes.txt": "not an image file extension", "stray.jpg": "file outside any class folder"}
    assert "notes.txt" in caplog.text or "stray.jpg" in caplog.text


def test_file_lists_txt_and_csv(tmp_path: Path, folder: Path, reference) -> None:
    files = image_files(folder)
    labels = [label for _, label in reference]
    (tmp_path / "tree").symlink_to(folder)  # list entries relative to the list's own folder: tree/<class>/<file>
    listing = tmp_path / "list.txt"
    entries = [f"tree/{p.relative_to(folder)} {label}" for p, label in zip(files, labels, strict=True)]
    listing.write_text("\n".join(["# path label", "", *entries]))
    assert_matches(build_dataset(listing), reference)

    csv_list = tmp_path / "list.csv"
    rows = ["path,label"] + [f"{p},{label}" for p, label in zip(files, labels, strict=True)]  # absolute paths
    csv_list.write_text("\n".join(rows))
    assert_matches(build_dataset(csv_list), reference)

    spaced = tmp_path / "with space.jpg"
    spaced.write_bytes(jpeg_bytes())
    unlabelled = tmp_path / "unlabelled.lst"
    unlabelled.write_text(f"{spaced}\n{spaced}\t7\n")
    dataset = build_dataset(f"filelist:{unlabelled}")
    assert [dataset[i][1] for i in range(2)] == [-1, 7]
    assert dataset.source.paths == [str(spaced), str(spaced)]


def test_file_list_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a.jpg,3\nb.jpg,cat\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: label 'cat' is not an integer"):
        build_dataset(bad)


@pytest.fixture(scope="module")
def shard_dir(folder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, imagefolder_samples(folder), per_shard=12)  # 40 samples -> 4 shards
    return out


def test_webdataset_layouts_random_access(shard_dir: Path, folder: Path, reference, tmp_path: Path) -> None:
    shards = sorted(shard_dir.glob("*.tar"))
    assert len(shards) == 4
    folder_of_shards = build_dataset(shard_dir)
    assert_matches(folder_of_shards, reference)
    assert folder_of_shards.source.keys == [p.stem for p in image_files(folder)]
    assert_matches(build_dataset(str(shard_dir / "shard-{000000..000003}.tar")), reference)
    single = build_dataset(shards[1])
    assert len(single) == 12 and single[0][1] == reference[12][1]
    # curate output: run dir with shards/index.json listing the shards (curate's layout: "file" beside the index)
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    for shard in shards:
        (run / "shards" / shard.name).symlink_to(shard)
    entries = [ShardEntry(s.name, 12, s.stat().st_size, "-", 0, "", "") for s in shards]
    write_index(run / "shards", entries)
    curated = build_dataset(run)
    assert_matches(curated, reference)
    assert_matches(build_dataset(f"wds:{run / 'shards' / 'index.json'}"), reference)
    assert "40 samples in 4 shard(s)" in curated.describe()


def test_malformed_shard_index_is_a_clear_dataset_error(shard_dir: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in sorted(shard_dir.glob("*.tar")):
        (shards / shard.name).symlink_to(shard)
    index = shards / "index.json"
    good = {"file": "shard-000000.tar", "count": 12, "bytes": 1, "sha256": "-", "partition": 0, "first_key": "",
            "last_key": ""}
    cases = [
        ("{not json", "unreadable shard index"),
        ("[]", "expected an object with a 'shards' list"),
        (json.dumps({"shards": [{"path": "shard-000000.tar"}]}), "shard entry 0 has fields ['path']"),
        (json.dumps({"shards": [{**good, "count": "12"}]}), "count='12' is not a int"),
        (json.dumps({"version": 9, "shards": [good]}), "shard index version 9"),
        (json.dumps({"version": 1, "shards": []}), "lists no shards"),
    ]
    for text, message in cases:
        index.write_text(text)
        with pytest.raises(DatasetError, match=re.escape(message)):
            build_dataset(tmp_path)
    index.write_text(json.dumps({"shards": [{**good, "file": "gone.tar"}]}))
    with pytest.raises(FileNotFoundError, match="listed shard 'gone.tar' does not exist"):
        build_dataset(tmp_path)
    index.write_text(json.dumps({"shards": [good]}))  # no version: written before the field existed, version 1
    assert len(build_dataset(tmp_path)) == 12


def test_tar_members_are_validated_and_grouped(tmp_path: Path) -> None:
    good = jpeg_bytes()
    shard = write_tar(
        tmp_path / "mixed.tar",
        [
            ("a/x1.jpg", good),
            ("a/x1.cls", b"5"),
            ("../escape.jpg", good),
            ("/abs.jpg", good),
            ("meta_only.json", b"{}"),
            ("noext", good),
            ("x2.JPEG", good),
            ("x2.json", b'{"label": 2}'),
            ("x2.jpeg", good),  # same key and (lowercased) extension again
        ],
    )
    with tarfile.open(shard, "a") as tar:
        link = tarfile.TarInfo("linked.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    scan = scan_shard(shard)
    assert scan.keys == ["a/x1", "x2"] and scan.image_ext == ["jpg", "jpeg"]
    reasons = dict(scan.rejected)
    assert "path escapes the tar" in reasons[f"{shard}:../escape.jpg"]
    assert "path escapes the tar" in reasons[f"{shard}:/abs.jpg"]
    assert "no extension" in reasons[f"{shard}:noext"]
    assert "duplicate member" in reasons[f"{shard}:x2.jpeg"]
    assert "not a regular file" in reasons[f"{shard}:linked.jpg"]
    assert "no image member" in reasons[f"{shard}:meta_only"]
    dataset = build_dataset(shard)
    assert [dataset[i][1] for i in range(2)] == [5, 2]
    assert split_key("d/k.seg.png") == ("d/k", "seg.png") and unsafe_name_reason("ok/name.jpg") is None


def test_decode_errors_substitute_next_index_and_are_logged(tmp_path: Path, caplog) -> None:
    good = [jpeg_bytes(seed=s) for s in range(3)]
    bad = broken_images()
    members = [("k0.jpg", good[0])]
    members += [(f"b{i}.jpg", data) for i, data in enumerate(bad.values())]
    members += [("k1.jpg", good[1]), ("k2.jpg", good[2]), ("k3.jpg", bad["text"])]
    members += [("k4.json", b"{not json")] + [("k4.jpg", good[0])]
    shard = write_tar(tmp_path / "broken.tar", members)
    dataset = build_dataset(shard)
    assert len(dataset) == 10
    with caplog.at_level(logging.WARNING):
        first_bad = dataset[1]  # 5 broken samples in a row, then k1
    assert dataset.decode_errors == 5
    np.testing.assert_array_equal(np.asarray(first_bad[0]), np.asarray(dataset[6][0]))
    assert f"{shard}:b0.jpg" in caplog.text and "truncated" in caplog.text
    assert "empty file" in caplog.text and "decompression bomb" in caplog.text
    # The last samples wrap around: k3 (text) -> k4 (bad label member) -> k0.
    np.testing.assert_array_equal(np.asarray(dataset[8][0]), np.asarray(dataset[0][0]))
    assert "bad label member" in caplog.text
    assert dataset.decode_errors == 7


def test_decode_error_count_is_shared_with_dataloader_workers(tmp_path: Path) -> None:
    members = []
    for i in range(12):
        members.append((f"s{i:02d}.jpg", broken_images()["zero_bytes"] if i % 3 == 0 else jpeg_bytes(16, 16, i)))
    dataset = build_dataset(write_tar(tmp_path / "s.tar", members), transform=lambda im: int(np.asarray(im).sum()))
    loader = DataLoader(dataset, batch_size=3, num_workers=2)
    assert len([batch for batch in loader]) == 4
    assert dataset.decode_errors == 4


def test_truncated_shard_is_an_error_per_sample_not_a_crash(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "t.tar", [(f"k{i}.jpg", jpeg_bytes(seed=i)) for i in range(3)])
    data = shard.read_bytes()
    cut = data.index(jpeg_bytes(seed=2)) + 100
    shard.write_bytes(data[:cut])
    dataset = build_dataset(shard)
    assert len(dataset) == 3  # k2's header survived, its data did not
    assert dataset.source.rejected == [
        (str(shard), "tar truncated or corrupt after 3 member(s): unexpected end of data")
    ]
    image, _ = dataset[2]  # unreadable (short read) -> replaced by k0
    np.testing.assert_array_equal(np.asarray(image), np.asarray(dataset[0][0]))
    assert dataset.decode_errors == 1


def test_kind_detection_and_clear_errors(tmp_path: Path, shard_dir: Path, folder: Path) -> None:
    assert detect_kind(str(folder)) == "imagefolder"
    assert detect_kind(str(shard_dir)) == "wds"
    assert split_kind_prefix("wds:/a/b") == ("wds", "/a/b") and split_kind_prefix("C:/x") == (None, "C:/x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty dataset directory"):
        build_dataset(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    (mixed / "cls").mkdir(parents=True)
    write_tar(mixed / "a.tar", [("k.jpg", jpeg_bytes())])
    with pytest.raises(ValueError, match="prefix"):
        build_dataset(mixed)
    assert len(build_dataset(f"wds:{mixed}")) == 1
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a dataset file: expected a tar archive, a .txt/.csv/.lst/.list file"):
        build_dataset(tmp_path / "data.bin")
    (tmp_path / "garbage.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="not a readable tar archive"):
        build_dataset(tmp_path / "garbage.tar")
    with pytest.raises(FileNotFoundError, match="2 of 2 shards do not exist"):
        build_dataset(str(tmp_path / "s-{0..1}.tar"))


def _pixel_sum(image) -> int:  # module level: spawned workers must be able to import the transform
    return int(np.asarray(image).sum())


@pytest.mark.slow
def test_decode_error_count_with_spawned_workers(tmp_path: Path) -> None:
    members = [(f"s{i}.jpg", b"" if i % 2 else jpeg_bytes(8, 8, i)) for i in range(8)]
    dataset = build_dataset(write_tar(tmp_path / "s.tar", members), transform=_pixel_sum)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="spawn")
    assert len(list(loader)) == 4
    assert dataset.decode_errors == 4


def test_dataset_layout_errors_say_what_was_found_and_expected(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.jpg", "b.png"):
        (flat / name).write_bytes(jpeg_bytes())
    with pytest.raises(DatasetError, match=f"{flat}: holds 2 image file\\(s\\) but no class subfolders; expected an "
                                           f"ImageFolder layout {flat}/<class>/<image>.*'filelist:' prefix"):
        build_dataset(flat)
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no image files .* in its 1 class folder\\(s\\) \\(cat\\); expected"):
        build_dataset(tmp_path / "classes")
    binary = tmp_path / "photos.txt"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(DatasetError, match="photos.txt: not a file list \\(not UTF-8 text"):
        build_dataset(binary)


def test_file_list_of_missing_files_names_the_first_one(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world\nmore text\n")
    dataset = build_dataset(notes)
    with pytest.raises(DatasetError, match=f"2 consecutive samples from index 0 are unreadable, the first: "
                                           f"{tmp_path / 'hello world'} \\(cannot read file: .*No such file"):
        dataset[0]


def test_flat_image_folder_is_unlabelled_where_labels_are_not_required(tmp_path: Path) -> None:
    """Pretraining reads a user's flat folder of photos (labels -1, other files recorded as rejected); evaluation,
    which needs labels, keeps refusing it (test above)."""
    flat = tmp_path / "photos"
    flat.mkdir()
    for name in ("b.jpg", "a.png"):
        (flat / name).write_bytes(jpeg_bytes())
    (flat / "notes.txt").write_text("x")
    assert detect_kind(str(flat), labels_required=False) == "images"
    dataset = build_dataset(flat, labels_required=False)
    assert [Path(dataset.source.name(i)).name for i in range(len(dataset))] == ["a.png", "b.jpg"]
    assert [dataset[i][1] for i in range(len(dataset))] == [-1, -1]
    assert dataset.source.rejected == [(str(flat / "notes.txt"), "not an image file extension")]
    assert "2 unlabelled images" in dataset.source.describe()
    # a subfolder makes the folder an ImageFolder; the `images:` prefix keeps it flat and records the subfolder
    (flat / "later").mkdir()
    assert detect_kind(str(flat), labels_required=False) == "imagefolder"
    forced = build_dataset(f"images:{flat}")
    assert len(forced) == 2 and (str(flat / "later"), "subfolder of a flat image folder") in forced.source.rejected
