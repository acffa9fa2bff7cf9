"""Every shipped recipe trains, in fp32 and in bf16 autocast: each one shrunk to a tiny size (depth 2, 2x2-patch crops,
64 prototypes) keeps its own stochastic depth, LayerScale, FFN, centering and schedules, and runs two steps on CPU,
so that no recipe can ship broken again (bf16 with drop path > 0.1 once crashed in efficient stochastic depth)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dinoforge.config import load_config
from pretrain.metrics import read_metrics
from pretrain.train import train
from pretrain.train_config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
HEADS = ("dino_head", "ibot_head")


STEPS = 2
WARMUPS = ("optim.warmup_steps", "optim.warmup_teacher_temp_steps", "optim.freeze_last_layer_steps")


def tiny_recipe(name: str, data: Path, out: Path, precision: str, **extra: object) -> TrainConfig:
    """The recipe at a tiny size, `STEPS` steps long (also a recipe given in epochs); its warm-ups keep their fractions
    of the run."""
    full = load_config(TrainConfig, CONFIGS / f"{name}.yaml", ["data.dataset=x", "init_weights=x"])
    fractions = {key: OmegaConf.select(OmegaConf.structured(full), key) / full.total_steps for key in WARMUPS}
    patch = full.model.patch_size  # 2x2 patches per global crop: 28 px at patch 14
    values = {
        **{key: int(fraction * STEPS) for key, fraction in fractions.items()},
        "name": f"{name}_{precision}", "output_dir": str(out), "total_steps": STEPS, "epochs": 0, "log_every": 1,
        "checkpoint_every": 0, "precision": precision, "peak_tflops": 1.0, "data.dataset": str(data),
        "data.batch_size_per_rank": 4, "data.num_workers": 0, "model.depth": 2, "model.img_size": 2 * patch,
        "data.multicrop.global_crops_size": 2 * patch, "data.multicrop.local_crops_size": patch,
        "data.multicrop.local_crops_number": 2, **{f"loss.{h}.out_dim": 64 for h in HEADS}, **extra,
    }
    return load_config(TrainConfig, CONFIGS / f"{name}.yaml", [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def vitl14_run(noise_image_folder, tmp_path_factory) -> Path:
    """The finished 224 px run that the high-resolution phase continues, at the same tiny size."""
    return train(tiny_recipe("vitl14", noise_image_folder, tmp_path_factory.mktemp("vitl14"), "fp32"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_two_steps(name, precision, noise_image_folder, tmp_path, one_thread, request):
    extra = {"init_weights": str(request.getfixturevalue("vitl14_run"))} if name == "highres" else {}
    cfg = tiny_recipe(name, noise_image_folder, tmp_path, precision, **extra)
    reference = load_config(TrainConfig, CONFIGS / f"{name}.yaml", ["data.dataset=x", "init_weights=x"])
    assert (cfg.model.drop_path_rate, cfg.model.layerscale) == (reference.model.drop_path_rate,
                                                                 reference.model.layerscale)
    run = train(cfg)
    records = read_metrics(run)
    assert [r["step"] for r in records if "total_loss" in r] == [0, 1]
    assert all(math.isfinite(r["total_loss"]) for r in records if "total_loss" in r)
    assert (run / "export" / "teacher_backbone.safetensors").is_file()
    assert records[0]["attention_backend"] == "sdpa" and "xformers" in records[0]["attention_reason"]
