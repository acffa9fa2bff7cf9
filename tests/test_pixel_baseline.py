"""The raw-pixel baseline (`--weights pixels`): its features are the averaged crop, and evaluation runs on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinoforge.models.config import PretrainedModelConfig
from dinoforge.models.loading import is_run_directory, load_backbone, weights_fingerprint
from dinoforge.models.pixel_baseline import PIXEL_SIDE, PixelBaseline
from evaluation.__main__ import main

EVAL = ["transform.resize_size=32", "transform.crop_size=32", "features.num_workers=0", "features.batch_size=8",
        "knn.ks=[1]"]


def test_features_are_the_crop_averaged_to_a_grid():
    x = torch.rand(3, 3, 48, 48)
    model = PixelBaseline()
    expected = F.adaptive_avg_pool2d(x, PIXEL_SIDE).flatten(1)
    assert model.embed_dim == 3 * PIXEL_SIDE**2 == expected.shape[1]
    assert torch.equal(model(x), expected)
    layers = model.get_intermediate_layers(x, n=2, return_class_token=True)
    assert len(layers) == 2
    for tokens, cls in layers:
        assert torch.equal(cls, expected) and torch.equal(tokens, expected[:, None, :])
    assert model.get_intermediate_layers(x, n=1, reshape=True)[0].shape == (3, model.embed_dim, 1, 1)


def test_loading_and_fingerprint_know_pixels_from_a_folder_named_pixels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pixels").mkdir()  # a folder of that name in the working directory is not a run
    cfg = PretrainedModelConfig(weights="pixels")
    assert not is_run_directory("pixels")
    assert isinstance(load_backbone(cfg), PixelBaseline)
    assert weights_fingerprint(cfg) == f"pixels:{PIXEL_SIDE}x{PIXEL_SIDE}"
    assert weights_fingerprint(cfg) != weights_fingerprint(PretrainedModelConfig(weights="random"))


def _colour_folder(root: Path, per_class: int, seed: int) -> Path:
    """Two classes that only colour separates (red and blue noise): raw pixels must get every image right."""
    rng = np.random.default_rng(seed)
    for name, channel in (("blue", 2), ("red", 0)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            pixels[..., channel] = rng.integers(180, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_knn_on_pixels_separates_colours_and_reports_the_baseline(tmp_path, capsys):
    train, val = _colour_folder(tmp_path / "train", 6, 0), _colour_folder(tmp_path / "val", 4, 1)
    out = tmp_path / "out"
    assert main(["knn", "--weights", "pixels", "--train", str(train), "--val", str(val), "--out", str(out),
                 f"features.cache_dir={tmp_path / 'cache'}", *EVAL]) == 0
    result = json.loads((out / "results_knn.json").read_text())
    assert result["metrics"]["top1_k1"] == 100.0
    meta = result["meta"]
    assert (meta["arch"], meta["depth"], meta["feature_dim"]) == ("pixels", 0, 3 * PIXEL_SIDE**2)
    assert meta["weights_fingerprint"] == f"pixels:{PIXEL_SIDE}x{PIXEL_SIDE}"
    assert "pixels" in capsys.readouterr().out
