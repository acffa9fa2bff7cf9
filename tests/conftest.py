"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions are slower with several threads on a shared CPU; workers use one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm on localhost for the session (`slurm.local_cluster`), SLURM_CONF set for clients;
    skips with the reason when it cannot run here (not root, packages missing, a daemon failed with its log tail)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from slurm.local_cluster import LocalCluster, LocalClusterError, missing_requirements

    reason = missing_requirements()
    if reason:
        pytest.skip(f"local Slurm cluster: {reason}")
    root = Path(tempfile.mkdtemp(prefix="dinoforge-slurm-"))  # short: munge's socket path must fit in 108 bytes
    cluster = LocalCluster(root)
    try:
        env = cluster.start()
    except LocalClusterError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"local Slurm cluster: daemon failed: {err}")
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield cluster
    cluster.stop()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def noise_image_folder(tmp_path_factory) -> Path:
    """An ImageFolder of 2 classes x 8 noise JPEGs (40 px): enough for a few training steps of any recipe."""
    root = tmp_path_factory.mktemp("noise_images")
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / f"c{label}").mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"c{label}/{i}.jpg")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """48 small JPEGs in 3 classes of coloured shapes: what a few training steps can tell apart."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / f"class{label}").mkdir()
        for i in range(16):
            pixels = rng.integers(0, 60, size=(48, 48, 3), dtype=np.uint8)
            x, y = rng.integers(0, 24, size=2)
            pixels[y : y + 24, x : x + 24, label] = 220
            Image.fromarray(pixels).save(root / f"class{label}" / f"{i}.jpg", quality=90)
    return root
