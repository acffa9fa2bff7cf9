"""The demo dataset generator (dinoforge.data.demo_images): layout, determinism, what it plants, and that its
classes are told apart by shape and texture, not by colour.

Small sizes only: a dataset of 12 images a class writes in under a second on 2 cores.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoforge.data import demo_images
from dinoforge.data.decode import ImageDecodeError, decode_image
from dinoforge.data.demo_images import CLASSES, MANIFEST_NAME, MARKER_NAME, write_demo_images

SMALL = {"per_class": 12, "val_per_class": 6, "size": 48, "seed": 0}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("demo") / "small"
    counts = write_demo_images(out, **SMALL)
    return out, counts, json.loads((out / MANIFEST_NAME).read_text())


def test_layout_and_counts(small):
    out, counts, manifest = small
    assert counts == manifest["counts"]
    assert manifest["arguments"] == SMALL and manifest["classes"] == list(CLASSES)
    assert sorted(p.name for p in out.iterdir()) == sorted(["pool", "train", "val", MANIFEST_NAME, MARKER_NAME])
    for split, per_class in (("train", SMALL["per_class"]), ("val", SMALL["val_per_class"])):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(CLASSES)
        for name in CLASSES:
            assert len(list((out / split / name).iterdir())) == per_class
        assert counts[split] == per_class * len(CLASSES)
    pool = [p for p in (out / "pool").rglob("*") if p.is_file()]
    assert len(pool) == counts["pool"]
    assert all(p.parent.parent == out / "pool" for p in pool)  # nested one level: pool/NN/img_NNNNN.ext
    assert {p.suffix for p in pool} == {".jpg", ".png"}
    planted = sum(counts[k] for k in ("exact_copies", "near_duplicates", "contaminants", "corrupt", "tiny"))
    assert counts["pool"] == counts["pool_clean"] + planted
    assert counts["pool_clean"] == SMALL["per_class"] * len(CLASSES)
    assert min(counts[k] for k in ("exact_copies", "near_duplicates", "contaminants", "corrupt", "tiny")) >= 1
    assert {entry["kind"] for entry in manifest["corrupt"]} == {"truncated_jpeg", "random_bytes", "three_bytes",
                                                                 "empty"}
    # Every pool file that is an image has a class; corrupt files have none.
    corrupt = {entry["file"] for entry in manifest["corrupt"]}
    assert set(manifest["pool_classes"]) == {p.relative_to(out).as_posix() for p in pool} - corrupt
    assert not list(out.parent.glob(".*"))  # the temporary folder is gone


def test_same_arguments_give_identical_bytes(small, tmp_path):
    out, _, _ = small
    again = tmp_path / "again"
    write_demo_images(again, **SMALL)
    assert _files(again) == _files(out)
    other = tmp_path / "other_seed"
    write_demo_images(other, **{**SMALL, "seed": 1})
    first, second = _files(out), _files(other)
    labelled = [k for k in first if k.startswith(("train/", "val/"))]
    assert labelled and all(first[k] != second[k] for k in labelled)  # same names, other images


def test_planted_kinds_are_what_the_manifest_says(small):
    out, _, manifest = small
    for entry in manifest["exact_copies"]:
        assert entry["file"] != entry["original"]
        assert (out / entry["file"]).read_bytes() == (out / entry["original"]).read_bytes()
    for entry in manifest["contaminants"]:
        assert entry["val"].startswith("val/")
        assert (out / entry["file"]).read_bytes() == (out / entry["val"]).read_bytes()
    unrelated = decode_image((out / manifest["exact_copies"][0]["original"]).read_bytes())

    def thumbnail(image: Image.Image) -> np.ndarray:  # 4 x 4 px averages: the pixel noise JPEG drops averages out
        return np.asarray(image.resize((16, 16), Image.BOX), np.float64)

    for entry in manifest["near_duplicates"]:
        data, original_data = (out / entry["file"]).read_bytes(), (out / entry["original"]).read_bytes()
        assert data != original_data
        near = decode_image(data)
        assert list(near.size) == entry["size"]
        # Redo the geometry on the original: what is left is the JPEG re-encoding. With the default sizes the mean
        # difference of 16 x 16 thumbnails is at most 8 levels (median 3.7), against 32 or more for another image.
        crop = tuple(entry["crop"])
        redone = decode_image(original_data).crop(crop).resize(near.size, Image.BICUBIC)
        other = unrelated.crop(crop).resize(near.size, Image.BICUBIC)
        diff = np.abs(thumbnail(near) - thumbnail(redone)).mean()
        assert diff < 12, entry
        assert np.abs(thumbnail(near) - thumbnail(other)).mean() > 2 * diff, entry
    for entry in manifest["corrupt"]:
        data = (out / entry["file"]).read_bytes()
        with pytest.raises(Exception):  # noqa: B017 - PIL raises OSError, UnidentifiedImageError or SyntaxError
            Image.open(io.BytesIO(data)).load()
        with pytest.raises(ImageDecodeError):
            decode_image(data)
    assert {entry["kind"]: len((out / entry["file"]).read_bytes()) for entry in manifest["corrupt"]
            if entry["kind"] in ("three_bytes", "empty")} == {"three_bytes": 3, "empty": 0}
    for entry in manifest["tiny"]:
        image = decode_image((out / entry["file"]).read_bytes())
        assert list(image.size) == entry["size"] and min(image.size) < 16


def test_curation_ingest_rejects_exactly_the_corrupt_and_tiny_files(small):
    from curate.sources.decode import DecodeLimits, probe_image

    out, _, manifest = small
    bad = {entry["file"] for entry in manifest["corrupt"] + manifest["tiny"]}
    rejected = {p.relative_to(out).as_posix() for p in (out / "pool").rglob("*")
                if p.is_file() and not probe_image(p.read_bytes(), DecodeLimits()).ok}
    assert rejected == bad
    assert manifest["expected"]["rejected"] == len(bad)


def test_splits_share_no_image_but_the_planted_contaminants(small):
    out, _, manifest = small
    files = _files(out)
    owners: dict[bytes, set[str]] = {}
    for name, data in files.items():
        if name.split("/")[0] in ("pool", "train", "val") and data:
            owners.setdefault(data, set()).add(name.split("/")[0])
    shared = [data for data, splits in owners.items() if len(splits) > 1]
    assert len(shared) == len(manifest["contaminants"])
    assert all(owners[data] == {"pool", "val"} for data in shared)


def test_copy_detection_finds_the_near_duplicates_and_few_natural_pairs(small):
    """Curation's weight-free dedup embedding (copydetect, cosine 0.8) joins every near-duplicate to its original,
    while clean images of one class stay apart: with the default sizes (seeds 0-2) 8-12 of 2,400 clean pool images
    have a clean neighbour at 0.8 or more, and the near-duplicates' lowest cosine to their original is 0.84-0.88
    (median 0.96)."""
    import torch

    from curate.dedup.config import COPYDETECT_THRESHOLDS
    from curate.embedding.copydetect import CopyDetectDescriptor

    out, _, manifest = small
    descriptor = CopyDetectDescriptor()
    names = sorted(manifest["pool_classes"])
    batch = torch.stack([descriptor.transform(Image.open(out / n).convert("RGB")) for n in names])
    features = torch.nn.functional.normalize(descriptor(batch), dim=1)
    index = {n: i for i, n in enumerate(names)}
    for entry in manifest["near_duplicates"]:
        similarity = float(features[index[entry["file"]]] @ features[index[entry["original"]]])
        assert similarity >= COPYDETECT_THRESHOLDS[0] + 0.02, entry
    copies = {e["file"] for e in manifest["exact_copies"] + manifest["near_duplicates"] + manifest["contaminants"]}
    copies |= {e["original"] for e in manifest["exact_copies"] + manifest["near_duplicates"]}
    clean = [index[n] for n in names if n not in copies and n not in {e["file"] for e in manifest["tiny"]}]
    similarity = features[clean] @ features[clean].T
    similarity.fill_diagonal_(-1)
    assert (similarity.max(1).values >= COPYDETECT_THRESHOLDS[0]).float().mean() < 0.05


def test_second_write_is_skipped_and_other_arguments_replace_it(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    counts = write_demo_images(out, **SMALL)

    def must_not_write(*args, **kwargs):
        raise AssertionError("rewrote a complete dataset")

    with monkeypatch.context() as patch:
        patch.setattr(demo_images, "_write_all", must_not_write)
        assert write_demo_images(out, **SMALL) == counts
    smaller = write_demo_images(out, **{**SMALL, "per_class": 5})
    assert smaller["train"] == 5 * len(CLASSES)
    assert len(list((out / "train" / CLASSES[0]).iterdir())) == 5
    assert json.loads((out / MARKER_NAME).read_text())["arguments"]["per_class"] == 5


def test_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    foreign = tmp_path / "photos"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "keep.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        write_demo_images(foreign, **SMALL)
    assert demo_images.main([str(foreign), "--per-class", "2"]) == 2
    assert "not a demo dataset" in capsys.readouterr().err
    assert (foreign / "train" / "keep.jpg").read_bytes() == b"mine"


def test_cli_writes_then_reuses(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [str(out), "--per-class", "3", "--val-per-class", "2", "--size", "40", "--seed", "5"]
    assert demo_images.main(args) == 0
    assert "written in" in capsys.readouterr().out
    assert json.loads((out / MARKER_NAME).read_text())["arguments"] == {"per_class": 3, "val_per_class": 2,
                                                                         "size": 40, "seed": 5}
    assert demo_images.main(args) == 0
    assert "already complete" in capsys.readouterr().out


# -- shape, not colour ----------------------------------------------------------------------------------------------


def _grey(images: list[Image.Image], side: int) -> np.ndarray:
    return np.stack([np.asarray(im.convert("L").resize((side, side), Image.BILINEAR), np.float64) for im in images])


def _colour_histogram(images: list[Image.Image], bins: int = 4) -> np.ndarray:
    """Joint RGB histogram (4 levels a channel), Hellinger-mapped."""
    pixels = np.stack([np.asarray(im.convert("RGB")) for im in images]) // (256 // bins)
    cells = (pixels[..., 0] * bins + pixels[..., 1]) * bins + pixels[..., 2]
    counts = np.stack([np.bincount(c.ravel(), minlength=bins ** 3) for c in cells]).astype(np.float64)
    return np.sqrt(counts / counts.sum(1, keepdims=True))


def _spectrum(images: list[Image.Image], side: int = 32, n_radius: int = 8, n_angle: int = 8) -> np.ndarray:
    """Contrast-normalised greyscale power spectrum pooled in radius x orientation bins; the magnitude of its DFT
    along orientation makes it rotation-invariant. Colour-blind by construction."""
    grey = _grey(images, side)
    grey = (grey - grey.mean((1, 2), keepdims=True)) / (grey.std((1, 2), keepdims=True) + 1e-6)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey), axes=(1, 2))) ** 2
    fy, fx = np.mgrid[0:side, 0:side] - side // 2
    radius, angle = np.hypot(fx, fy), np.mod(np.arctan2(fy, fx), np.pi)
    r_bin = np.minimum((radius / (side / 2) * n_radius).astype(int), n_radius - 1)
    a_bin = np.minimum((angle / np.pi * n_angle).astype(int), n_angle - 1)
    pooled = np.stack([power[:, (r_bin == r) & (a_bin == a) & (radius > 0)].sum(1)
                       for r in range(n_radius) for a in range(n_angle)], 1).reshape(len(images), n_radius, n_angle)
    return np.abs(np.fft.fft(np.log(pooled + 1e-3), axis=2)).reshape(len(images), -1)


def _knn_accuracy(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray,
                  k: int = 10) -> float:
    train = train / (np.linalg.norm(train, axis=1, keepdims=True) + 1e-9)
    val = val / (np.linalg.norm(val, axis=1, keepdims=True) + 1e-9)
    neighbours = np.argsort(-(val @ train.T), axis=1)[:, :k]
    votes = np.zeros((len(val), len(CLASSES)))
    np.add.at(votes, (np.arange(len(val))[:, None], train_labels[neighbours]), 1)
    return float((votes.argmax(1) == val_labels).mean())


def _split(root: Path) -> tuple[list[Image.Image], np.ndarray]:
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / name).iterdir()):
            images.append(Image.open(path).convert("RGB"))
            labels.append(label)
    return images, np.array(labels)


def test_classes_differ_by_shape_not_colour(tmp_path):
    """k-NN (k=10, cosine; 400 train and 150 val images at the default 64 px; chance 10%). Measured over seeds 0-9:
    colour histograms 10-17%, a greyscale power spectrum 82-91%, raw 16 x 16 grey pixels 21-25% (the patterns'
    phase and rotation vary, so a model must learn invariances, not match pixels)."""
    out = tmp_path / "demo"
    write_demo_images(out, per_class=40, val_per_class=15, seed=0)
    train, train_labels = _split(out / "train")
    val, val_labels = _split(out / "val")
    colour = _knn_accuracy(_colour_histogram(train), train_labels, _colour_histogram(val), val_labels)
    shape = _knn_accuracy(_spectrum(train), train_labels, _spectrum(val), val_labels)
    assert colour < 0.3, colour
    assert shape > 0.6, shape
