"""Every shipped pretraining recipe loads strictly and builds the model it promises (on the meta device)."""

from pathlib import Path

import pytest
import torch

from dinoforge.config import load_config
from pretrain.meta_arch import SSLMetaArch
from pretrain.train_config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
REQUIRED = ["data.dataset=/data/train", "init_weights=/runs/pretrain/vitl14"]


def load(name: str) -> TrainConfig:
    overrides = REQUIRED if name == "highres" else REQUIRED[:1]
    return load_config(TrainConfig, CONFIGS / f"{name}.yaml", overrides)


@pytest.mark.parametrize("name,arch,width,depth,prototypes,separate,backbone_params_m", [
    ("cpu_tiny", "vit_tiny", 192, 4, 1024, False, 1.8),
    ("gpu_small", "vit_small", 384, 12, 16384, False, 21.7),
    ("vits14", "vit_small", 384, 12, 65536, False, 21.7),
    ("vitb14", "vit_base", 768, 12, 65536, False, 86.0),
    ("vitl14", "vit_large", 1024, 24, 131072, True, 303.0),
    ("vitg14", "vit_giant2", 1536, 40, 131072, True, 1135.0),
    ("highres", "vit_large", 1024, 24, 131072, True, 304.0),
])
def test_recipe_builds(name, arch, width, depth, prototypes, separate, backbone_params_m):
    cfg = load(name)
    assert cfg.model.arch == arch
    with torch.device("meta"):
        meta = SSLMetaArch(cfg.model, cfg.loss)
    backbone = meta.student["backbone"]
    assert (backbone.embed_dim, len(backbone.blocks)) == (width, depth)
    assert meta.student["dino_head"].last_layer.weight_v.shape[0] == prototypes
    assert ("ibot_head" in meta.student) == separate
    params_m = sum(p.numel() for p in backbone.parameters()) / 1e6
    assert params_m == pytest.approx(backbone_params_m, rel=0.02)


def test_reference_recipe_values():
    g = load("vitg14")
    assert (g.model.ffn_layer, g.model.drop_path_rate, g.model.drop_path_uniform) == ("swiglufused", 0.4, True)
    assert (g.optim.base_lr, g.optim.layerwise_decay, g.optim.momentum_teacher) == (2e-4, 1.0, 0.994)
    assert (g.data.batch_size_per_rank, g.data.multicrop.local_crops_size) == (12, 98)
    assert g.loss.centering == "sinkhorn_knopp"
    assert g.loss.dino_head.bottleneck_dim == 384 and g.optim.warmup_steps == 80 * 1250
    h = load("highres")
    assert (h.model.img_size, h.data.multicrop.global_crops_size, h.init_weights) == (518, 518, "/runs/pretrain/vitl14")


def test_required_dataset_is_enforced():
    from dinoforge.config import ConfigError

    with pytest.raises(ConfigError, match="data.dataset"):
        load_config(TrainConfig, CONFIGS / "vits14.yaml")
