"""Image files on a file system: ImageFolder trees and plain file lists.

A source lists samples and reads their raw bytes; decoding happens in `ImageDataset`. Every file that is not
taken is recorded in `rejected` with the reason (and logged as a summary), so nothing disappears silently.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from pathlib import Path

from dinoforge.data.errors import DatasetError

logger = logging.getLogger(__name__)

_PATH_AND_LABEL = re.compile(r"^(.*\S)\s+(-?\d+)$")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"})


class LocalFileSource:
    """Samples that are files on a local file system: `paths[i]` with `labels[i]` (-1 when unknown)."""

    paths: list[str]
    labels: list[int]

    @property
    def targets(self) -> list[int]:
        """Labels of all samples, in order (torchvision's attribute name)."""
        return self.labels

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def read(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def label(self, index: int) -> int:
        return self.labels[index]


class ImageFolderSource(LocalFileSource):
    """`root/<class>/**/<image>`: label = index of the class folder in sorted order (torchvision's convention)."""

    kind = "imagefolder"

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)
        top = Path(root)
        if not top.is_dir():
            raise NotADirectoryError(f"ImageFolder root is not a directory: {root}")
        self.rejected: list[tuple[str, str]] = []
        self.classes = sorted(e.name for e in os.scandir(top) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DatasetError(f"{root}: no class subfolders; an ImageFolder root holds one folder per class "
                               f"({root}/<class>/<image>)")
        for entry in sorted(os.scandir(top), key=lambda e: e.name):
            if not entry.is_dir():
                self.rejected.append((entry.path, "file outside any class folder"))
        self.paths: list[str] = []
        self.labels: list[int] = []
        for label, name in enumerate(self.classes):
            n_before = len(self.paths)
            for dirpath, dirnames, filenames in os.walk(top / name, followlinks=True):
                dirnames.sort()  # os.walk order is file-system dependent; sorted walks give a stable sample order
                for filename in sorted(filenames):
                    path = os.path.join(dirpath, filename)
                    if filename.startswith("."):
                        self.rejected.append((path, "hidden file"))
                    elif Path(filename).suffix.lower() not in IMAGE_SUFFIXES:
                        self.rejected.append((path, "not an image file extension"))
                    else:
                        self.paths.append(path)
                        self.labels.append(label)
            if len(self.paths) == n_before:
                logger.warning("ImageFolder %s: class folder %r holds no image files", root, name)
        if not self.paths:
            raise DatasetError(
                f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its {len(self.classes)} class "
                f"folder(s) ({', '.join(self.classes[:5])}{', ...' if len(self.classes) > 5 else ''}); expected "
                f"{root}/<class>/<image>")
        _log_rejections(self.root, self.rejected)

    def describe(self) -> str:
        return (
            f"ImageFolder {self.root}: {len(self)} images in {len(self.classes)} classes"
            f"{_rejection_summary(self.rejected)}"
        )


class FileListSource(LocalFileSource):
    """A text (`.txt`: `path [label]` per line) or CSV (`path,label` rows, optional header) list of image files.

    Relative paths are resolved against the list's folder; blank lines and lines starting with `#` are ignored;
    a missing label is -1.
    """

    kind = "filelist"
    classes: list[str] | None = None

    def __init__(self, list_path: str | Path) -> None:
        self.root = str(list_path)
        path = Path(list_path)
        if not path.is_file():
            raise FileNotFoundError(f"file list not found: {list_path}")
        self.rejected: list[tuple[str, str]] = []
        try:
            rows = _read_csv_rows(path) if path.suffix.lower() == ".csv" else _read_text_rows(path)
        except UnicodeDecodeError as err:
            raise DatasetError(f"{list_path}: not a file list (not UTF-8 text: {err.reason} at byte {err.start}); "
                               "expected one 'path [label]' per line") from None
        base = path.parent
        self.paths: list[str] = []
        self.labels: list[int] = []
        for line_no, file, label in rows:
            if not file:
                raise DatasetError(f"{list_path}:{line_no}: empty path")
            self.paths.append(str(base / file))  # an absolute `file` stays absolute
            self.labels.append(label)
        if not self.paths:
            raise DatasetError(f"{list_path}: the file list names no images")

    def describe(self) -> str:
        labelled = sum(label >= 0 for label in self.labels)
        return f"file list {self.root}: {len(self)} images, {labelled} with labels"


def _parse_label(text: str, where: str) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DatasetError(f"{where}: label {text!r} is not an integer class index") from None
    if label < -1:
        raise DatasetError(f"{where}: label {label} is negative (use -1 or leave it out for 'unknown')")
    return label


def _read_text_rows(path: Path) -> list[tuple[int, str, int]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # The label is the last whitespace-separated token when it is an integer, so paths may hold spaces.
            match = _PATH_AND_LABEL.match(line)
            if match:
                rows.append((line_no, match[1], _parse_label(match[2], f"{path}:{line_no}")))
            else:
                rows.append((line_no, line, -1))
    return rows


def _read_csv_rows(path: Path) -> list[tuple[int, str, int]]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if line_no == 1 and row[0].strip().lower() in ("path", "file", "filename", "image"):
                continue  # header row
            if len(row) > 2:
                raise DatasetError(f"{path}:{line_no}: expected 'path' or 'path,label', got {len(row)} columns")
            label = _parse_label(row[1].strip(), f"{path}:{line_no}") if len(row) == 2 and row[1].strip() else -1
            rows.append((line_no, row[0].strip(), label))
    return rows


def _rejection_summary(rejected: list[tuple[str, str]]) -> str:
    if not rejected:
        return ""
    counts = Counter(reason for _, reason in rejected)
    return "; skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def _log_rejections(root: str, rejected: list[tuple[str, str]]) -> None:
    if not rejected:
        return
    logger.warning("%s%s; first: %s (%s)", root, _rejection_summary(rejected), rejected[0][0], rejected[0][1])
    for path, reason in rejected:
        logger.debug("skipped %s: %s", path, reason)
