"""What a dataset path is: one kind detection and one shard listing for every stage (torch-free).

Layouts: a `folder` of image files, a single `tar` archive, a `filelist` (`.txt`/`.csv`/`.lst`/`.list`), or
`shards`: WebDataset tars named by a brace pattern or glob, a folder of tars, or a curate run / shard folder with
`shards/index.json`. Stages read a layout their own way (training needs class subfolders in a folder and reads a
tar as WebDataset samples; curation records every file and every tar member), but they agree on what the path is.
"""

from __future__ import annotations

import glob
from pathlib import Path

from braceexpand import braceexpand

from dinoforge.data.errors import DatasetError
from dinoforge.data.file_list import FILE_LIST_SUFFIXES, is_file_list
from dinoforge.data.formats import IMAGE_SUFFIXES
from dinoforge.data.shard_index import INDEX_NAME, index_path, shard_files

LAYOUTS = ("folder", "tar", "filelist", "shards")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what a folder of WebDataset shards holds
# Training's and evaluation's `kind:` prefixes that force a layout reading ("images": a flat folder, no labels).
KIND_PREFIXES = ("imagefolder", "images", "filelist", "wds")


def is_pattern(path: str) -> bool:
    return ("{" in path and "}" in path) or any(c in path for c in "*?[")


def detect_layout(path: str) -> str:
    """One of `LAYOUTS` for `path`; `FileNotFoundError` when it does not exist, `DatasetError` when it is none."""
    if is_pattern(path) and not Path(path).exists():
        return "shards"
    p = Path(path)
    if p.is_file():
        lower = p.name.lower()
        if lower.endswith(TAR_SUFFIXES):
            return "tar"
        if is_file_list(lower):
            return "filelist"
        if p.name == INDEX_NAME:
            return "shards"
        raise DatasetError(
            f"{path}: not a dataset file: expected a tar archive, a {'/'.join(FILE_LIST_SUFFIXES)} file list or a "
            f"shards/{INDEX_NAME}"
        )
    if not p.is_dir():
        raise FileNotFoundError(f"dataset path does not exist: {path}")
    if index_path(p).is_file():
        return "shards"
    entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    has_tars = any(e.is_file() and e.name.lower().endswith(SHARD_SUFFIXES) for e in entries)
    has_dirs = any(e.is_dir() for e in entries)
    has_images = any(e.is_file() and e.suffix.lower() in IMAGE_SUFFIXES for e in entries)
    if has_tars and (has_dirs or has_images):
        raise DatasetError(
            f"{path}: holds both tar files and {'subfolders' if has_dirs else 'images'}; say which one you mean "
            "(a 'wds:' or 'imagefolder:' prefix, or a source `kind`)"
        )
    return "shards" if has_tars else "folder"


def shard_paths(spec: str) -> list[str]:
    """The tar shards named by a brace pattern or glob, a tar file, an `index.json`, a curate run or shard folder,
    or a folder of tars; each must exist."""
    p = Path(spec)
    if is_pattern(spec) and not p.exists():
        paths = []
        for pattern in braceexpand(spec):
            paths.extend(sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern])
        missing = [s for s in paths if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"{spec}: {len(missing)} of {len(paths)} shards do not exist, e.g. {missing[0]}")
        if not paths:
            raise FileNotFoundError(f"{spec}: no shards match")
        return paths
    if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES):
        return [str(p)]
    if index_path(p).is_file():
        return shard_files(p)
    if p.is_dir():
        paths = sorted(str(s) for s in p.iterdir() if s.is_file() and s.name.lower().endswith(SHARD_SUFFIXES))
        if paths:
            return paths
    raise FileNotFoundError(f"{spec}: no tar shards found (expected *.tar files or a shards/{INDEX_NAME})")


def split_kind_prefix(spec: str) -> tuple[str | None, str]:
    """`"wds:/data/x"` -> ("wds", "/data/x"); no known prefix -> (None, spec)."""
    head, sep, rest = spec.partition(":")
    if sep and head in KIND_PREFIXES:
        return head, rest
    return None, spec


def detect_kind(path: str, labels_required: bool = True) -> str:
    """Training's reading of `path`: "imagefolder", "images", "filelist" or "wds", or a `DatasetError` saying what was
    expected.

    A folder with subfolders is an ImageFolder (its classes); a flat folder of images is "images" (unlabelled) unless
    `labels_required` (evaluation); a tar is read as WebDataset shards.
    """
    layout = detect_layout(path)
    if layout == "filelist":
        return "filelist"
    if layout != "folder":
        return "wds"
    p = Path(path)
    if any(e.is_dir() and not e.name.startswith(".") for e in p.iterdir()):
        return "imagefolder"
    images = sum(1 for e in p.iterdir() if e.suffix.lower() in IMAGE_SUFFIXES)
    if images and not labels_required:
        return "images"
    if images:
        # The common mistake: pointing at a flat folder of photos, which has no labels to number.
        raise DatasetError(
            f"{path}: holds {images} image file(s) but no class subfolders; expected an ImageFolder layout "
            f"{path}/<class>/<image> (move the images into a class folder), or list them in a .txt file and use "
            "it with a 'filelist:' prefix"
        )
    raise DatasetError(f"{path}: empty dataset directory (no class subfolders, no .tar shards, no images)")
