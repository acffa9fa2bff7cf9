"""Image files on a file system: ImageFolder trees and plain file lists.

A source lists samples and reads their raw bytes; decoding happens in `ImageDataset`. Every file that is not
taken is recorded in `rejected` with the reason (and logged as a summary), so nothing disappears silently.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

from dinoforge.data.errors import DatasetError
from dinoforge.data.file_list import read_file_list
from dinoforge.data.formats import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)


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


class FlatFolderSource(LocalFileSource):
    """`root/<image>`: the image files directly in one folder, unlabelled (-1): a folder of photos to pretrain on."""

    kind = "images"
    classes: list[str] | None = None

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)
        if not Path(root).is_dir():
            raise NotADirectoryError(f"image folder is not a directory: {root}")
        self.rejected: list[tuple[str, str]] = []
        self.paths: list[str] = []
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.name.startswith("."):
                self.rejected.append((entry.path, "hidden file"))
            elif entry.is_dir():
                self.rejected.append((entry.path, "subfolder of a flat image folder"))
            elif Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                self.rejected.append((entry.path, "not an image file extension"))
            else:
                self.paths.append(entry.path)
        self.labels: list[int] = [-1] * len(self.paths)
        if not self.paths:
            raise DatasetError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder")
        _log_rejections(self.root, self.rejected)

    def describe(self) -> str:
        return f"image folder {self.root}: {len(self)} unlabelled images{_rejection_summary(self.rejected)}"


class FileListSource(LocalFileSource):
    """The images of a file list (format: `dinoforge.data.file_list`); a missing label is -1."""

    kind = "filelist"
    classes: list[str] | None = None

    def __init__(self, list_path: str | Path) -> None:
        self.root = str(list_path)
        self.rejected: list[tuple[str, str]] = []
        entries = read_file_list(list_path)
        self.paths: list[str] = [str(e.path) for e in entries]
        self.labels: list[int] = [e.label for e in entries]
        if not self.paths:
            raise DatasetError(f"{list_path}: the file list names no images")

    def describe(self) -> str:
        labelled = sum(label >= 0 for label in self.labels)
        return f"file list {self.root}: {len(self)} images, {labelled} with labels"


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
