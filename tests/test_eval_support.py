"""Shared helpers of the evaluation tests (no tests here): thread limit, labelled Imagenette subsets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from curate_photos import dataset_root


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread. The shared test machine has 2 cores for several busy processes; there
    OpenMP threads spinning on small tensors made L-BFGS 100x and the ViT forward 2x slower than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def imagenette_file_list(out: Path, split: str, per_class: int, offset: int = 0) -> Path:
    """A `path label` file list of `per_class` Imagenette photos of every class (label = sorted class index)."""
    root = dataset_root("imagenette") / split
    lines = []
    for label, cls in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        lines += [f"{p} {label}" for p in sorted(cls.iterdir())[offset : offset + per_class]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
