"""`python -m demo prepare DATA --out DIR`: a user's image folder -> the file lists the demo's stages read.

Writes DIR/pool.txt (every file under the pool folder, images or not: curation decides and records each rejection),
and, when DATA's sub-folders name classes, DIR/train.txt and DIR/val.txt (`path label` lines) for the k-NN
evaluation; DIR/splits.json (written last) says which layout was found, the classes and counts, and why k-NN is
skipped when there are no labels. Layouts, in this order:

  train_val      DATA/train/CLASS/... and DATA/val/CLASS/...: the pool is DATA/train, the splits are as given;
  class_folders  DATA/CLASS/... (two classes or more): the pool is all of DATA, and one image in VAL_EVERY of each
                 class (chosen by a hash of its path, so the split never changes) is held out as val; curation
                 then decontaminates the pool against it, as it must;
  unlabelled     anything else: the pool is all of DATA, and there is no evaluation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dinoforge.atomic import atomic_write_json, atomic_write_text
from dinoforge.data.formats import IMAGE_SUFFIXES

SPLITS_FILE = "splits.json"
VAL_EVERY = 10  # one image in ten of every class is held out (at least one per class that has two)


class PrepareError(ValueError):
    """DATA cannot feed the demo (missing, or holds no images); the message says what to do."""


def _files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, hidden files and folders left out, in sorted order."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _images(files: list[Path]) -> list[Path]:
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def _class_images(folder: Path) -> dict[str, list[Path]]:
    """{class: its images} for each sub-folder of `folder` that holds images (at any depth)."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _images(_files(sub))
        if images:
            classes[sub.name] = images
    return classes


def _held_out(path: Path, root: Path) -> bool:
    digest = hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "big") % VAL_EVERY == 0


def _held_out_images(images: list[Path], root: Path) -> list[Path]:
    """The val share of one class: the images whose path hashes into it; a class of two or more images gives at least
    one and keeps at least one for the bank, a class of one image gives none."""
    if len(images) < 2:
        return []
    held = [p for p in images if _held_out(p, root)] or images[-1:]
    return held if len(held) < len(images) else held[:-1]


def _labelled_lines(classes: dict[str, list[Path]], names: list[str]) -> str:
    return "".join(f"{p} {names.index(c)}\n" for c, images in classes.items() for p in images)


def prepare(data: str | Path, out: str | Path) -> dict:
    """Write the demo's file lists for the folder `data` into `out`; return what splits.json says."""
    if not str(data).strip():
        raise PrepareError("DATA is empty: give a folder of images, e.g. make demo DATA=/path/to/images")
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise PrepareError(f"DATA={data}: no such folder; give a folder of images (class sub-folders for k-NN)")
    train_dir, val_dir = root / "train", root / "val"
    splits: dict = {"data": str(root)}
    if train_dir.is_dir() and val_dir.is_dir() and _class_images(train_dir) and _class_images(val_dir):
        train, val = _class_images(train_dir), _class_images(val_dir)
        unknown = sorted(set(val) - set(train))
        if unknown:
            raise PrepareError(f"DATA={data}: val classes {unknown[:5]} have no train folder; train/ and val/ must "
                               "hold the same class sub-folders")
        pool_root = train_dir
        splits.update(layout="train_val", pool=str(pool_root))
    else:
        classes = _class_images(root)
        pool_root = root
        if len(classes) >= 2:
            train, val = {}, {}
            for name, images in classes.items():
                held = _held_out_images(images, root)
                train[name] = [p for p in images if p not in held]
                if held:
                    val[name] = held
            splits.update(layout="class_folders", pool=str(root), val_every=VAL_EVERY)
        else:
            train = val = {}
            splits.update(layout="unlabelled", pool=str(root),
                          reason=f"k-NN skipped: {data} has no class sub-folders (found "
                                 f"{len(classes)} sub-folder{'s' if len(classes) != 1 else ''} with images), "
                                 "so there are no labels to evaluate with")
    pool = _files(pool_root)
    n_images = len(_images(pool))
    if n_images == 0:
        raise PrepareError(f"DATA={data}: no images in it ({len(pool)} files, none named "
                           f"{', '.join(sorted(IMAGE_SUFFIXES)[:6])}, ...); give a folder of images")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pool.txt", "".join(f"{p}\n" for p in pool))
    names = sorted(train)
    for split, classes in (("train", train), ("val", val)):
        path = out / f"{split}.txt"
        if classes:
            atomic_write_text(path, _labelled_lines(classes, names))
        else:
            path.unlink(missing_ok=True)
    splits.update(classes=names, counts={"pool_files": len(pool), "pool_images": n_images,
                                         "train": sum(map(len, train.values())), "val": sum(map(len, val.values()))})
    atomic_write_json(out / SPLITS_FILE, splits)
    return splits


def read_splits(folder: str | Path) -> dict | None:
    """splits.json of a prepared folder, or None (the demo's generated dataset has none)."""
    path = Path(folder) / SPLITS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
