"""`python -m demo prepare`: which layout a user's folder has, the file lists it writes, and one-line errors for a
DATA that cannot feed the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from demo.__main__ import main
from demo.prepare import VAL_EVERY, prepare
from dinoforge.data.datasets import build_dataset


def _image(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (value, 255 - value, 0)).save(path)
    return path


def _lines(path: Path) -> list[tuple[str, int]]:
    return [(line.rsplit(" ", 1)[0], int(line.rsplit(" ", 1)[1])) for line in path.read_text().splitlines()]


def test_class_folders_hold_out_a_stable_share_of_every_class(tmp_path):
    data = tmp_path / "photos"
    for c, name in enumerate(("cats", "dogs", "owls")):
        for i in range(40):
            _image(data / name / f"{i}.png", c * 60 + i)
    _image(data / "lonely" / "only.png")  # a class of one image: it stays in the bank, nothing to hold out
    (data / "cats" / "notes.txt").write_text("not an image")
    (data / ".hidden").mkdir()
    _image(data / ".hidden" / "x.png")
    splits = prepare(data, tmp_path / "out")
    out = tmp_path / "out"
    assert splits["layout"] == "class_folders" and splits["classes"] == ["cats", "dogs", "lonely", "owls"]
    pool = out.joinpath("pool.txt").read_text().splitlines()
    assert len(pool) == 3 * 40 + 2 and str(data / "cats" / "notes.txt") in pool  # curation rejects it, with a reason
    assert not any(".hidden" in line for line in pool)
    train, val = _lines(out / "train.txt"), _lines(out / "val.txt")
    assert sorted(p for p, _ in train + val) == sorted(p for p in pool if p.endswith(".png"))
    assert not {p for p, _ in train} & {p for p, _ in val}
    by_class = {label: sum(1 for _, lab in val if lab == label) for label in (0, 1, 3)}
    assert all(1 <= n < 40 for n in by_class.values()) and 2 not in {lab for _, lab in val}
    assert 40 * 3 / VAL_EVERY / 3 < len(val) < 40 * 3 / VAL_EVERY * 3  # about one in VAL_EVERY
    assert all(Path(p).parent.name == splits["classes"][label] for p, label in train + val)
    assert splits["counts"] == {"pool_files": 122, "pool_images": 121, "train": len(train), "val": len(val)}
    assert "reason" not in splits
    prepare(data, tmp_path / "again")  # the split depends on the paths only
    assert (tmp_path / "again" / "val.txt").read_text() == (out / "val.txt").read_text()
    labelled = build_dataset(str(out / "val.txt"), with_labels=True)  # the evaluation reads the list as written
    assert len(labelled) == len(val)


def test_train_and_val_folders_are_used_as_given(tmp_path):
    data = tmp_path / "imagenette"
    for split, n in (("train", 6), ("val", 2)):
        for name in ("a", "b"):
            for i in range(n):
                _image(data / split / name / f"{i}.jpg", i)
    splits = prepare(data, tmp_path / "out")
    assert splits["layout"] == "train_val" and splits["pool"] == str(data / "train")
    assert splits["counts"] == {"pool_files": 12, "pool_images": 12, "train": 12, "val": 4}
    assert all("/val/" in p for p, _ in _lines(tmp_path / "out" / "val.txt"))


def test_unlabelled_folder_has_a_pool_and_a_reason(tmp_path, capsys):
    data = tmp_path / "flat"
    for i in range(3):
        _image(data / f"{i}.png")
    assert main(["prepare", str(data), "--out", str(tmp_path / "out")]) == 0
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert splits["layout"] == "unlabelled" and "k-NN skipped" in splits["reason"]
    assert not (tmp_path / "out" / "val.txt").exists() and not (tmp_path / "out" / "train.txt").exists()
    assert "k-NN skipped" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["missing", "empty", "no_images", "blank"])
def test_bad_data_is_one_line(tmp_path, capsys, kind):
    data = {"missing": tmp_path / "nowhere", "empty": tmp_path / "empty", "no_images": tmp_path / "docs",
            "blank": ""}[kind]
    if kind == "empty":
        data.mkdir()
    if kind == "no_images":
        data.mkdir()
        (data / "readme.txt").write_text("hello")
    assert main(["prepare", str(data), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: DATA") and "\n" not in err and "Traceback" not in err
    assert {"missing": "no such folder", "empty": "no images", "no_images": "no images",
            "blank": "DATA is empty"}[kind] in err
    assert not (tmp_path / "out" / "splits.json").exists()
