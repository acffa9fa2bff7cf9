"""Issue 26 point 7: evaluation results name the model actually loaded (a run directory's own architecture, not the
config's defaults), and a train bank smaller than every k gives numbers (k clamped to the bank, with a warning)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dinoforge.models.config import ModelConfig, build_backbone
from dinoforge.models.weights import export_official
from evaluation.__main__ import main
from evaluation.knn import fit_ks, knn_classify, knn_evaluate_report


@pytest.mark.parametrize(("ks", "n", "used", "reasons"), [
    ((10, 20), 15, [10], {20: "k > 15 train samples"}),
    ((10, 20), 10, [10], {20: "k > 10 train samples"}),  # a k equal to the bank fits: no clamp
    ((10, 20), 20, [10, 20], {}),
    ((10, 20), 5, [5], {10: "k > 5 train samples; clamped to k=5", 20: "k > 5 train samples; clamped to k=5"}),
    ((10,), 9, [9], {10: "k > 9 train samples; clamped to k=9"}),
    ((10,), 1, [1], {10: "k > 1 train samples; clamped to k=1"}),  # one train image is still a bank
    ((10, 20), 0, [], {10: "k > 0 train samples", 20: "k > 0 train samples"}),
])
def test_fit_ks(ks, n, used, reasons):
    assert fit_ks(ks, n) == (used, reasons)


def test_a_bank_smaller_than_every_k_is_clamped_not_empty(caplog):
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(6, 8, generator=generator), torch.randn(5, 8, generator=generator)
    labels, test_labels = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 2, 0, 1])
    report = knn_evaluate_report(train, labels, test, test_labels, ks=(10, 20), n_per_class=[1])
    assert set(report["metrics"]) >= {"top1_k6", "top5_k6", "1shot_top1_k3"}
    pred = knn_classify(train, labels, test, k=6, num_classes=3)
    assert report["metrics"]["top1_k6"] == pytest.approx(100.0 * (pred == test_labels).double().mean().item())
    assert {(s["train"], s["k"]) for s in report["skipped"]} == {("full", 10), ("full", 20), ("1shot", 10),
                                                                  ("1shot", 20)}
    assert "clamped to k=6" in caplog.text


def _tiny_run(root: Path) -> Path:
    """A pretrain run folder whose export holds a 2-block ViT-Ti/8 (32 px), as `pretrain export` writes it."""
    cfg = ModelConfig(arch="vit_tiny", depth=2, patch_size=8, img_size=32, layerscale=1.0)
    export = root / "run" / "export"
    export.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in export_official(build_backbone(cfg, drop_path=False)).items()},
              export / "teacher_backbone.safetensors")
    (export / "model.json").write_text(json.dumps(asdict(cfg)))
    return root / "run"


def _image_folder(root: Path, per_class: int) -> Path:
    for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), tuple(v + 5 * i for v in colour)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_knn_of_a_run_directory_names_its_model_and_clamps_k(tmp_path):
    run = _tiny_run(tmp_path)
    train, val = _image_folder(tmp_path / "train", 2), _image_folder(tmp_path / "val", 1)
    out = tmp_path / "out"
    assert main(["knn", "--weights", str(run), "--train", str(train), "--val", str(val), "--out", str(out),
                 "transform.resize_size=36", "transform.crop_size=32", "features.num_workers=0",
                 "features.cache_dir=null", "features.device=cpu"]) == 0
    result = json.loads((out / "results_knn.json").read_text())
    meta = result["meta"]
    assert (meta["arch"], meta["patch_size"], meta["depth"]) == ("vit_tiny", 8, 2)  # config defaults: vit_small/14
    assert meta["feature_dim"] == 192
    assert "vit_tiny/8" in (out / "results_knn.md").read_text()
    # 4 train images, every default k (10, 20, 100, 200) above them: k=4, not an empty result
    assert "top1_k4" in result["metrics"] and len(result["details"]["skipped"]) == 4
