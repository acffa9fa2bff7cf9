"""torch.hub entrypoints: official names and construction arguments, local weights only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dinoforge.models.ffn import Mlp, SwiGLUFFN
from dinoforge.models.vision_transformer import vit_small
from dinoforge.models.weights import export_official, save_safetensors

REPO = str(Path(__file__).resolve().parents[1])
OFFICIAL = {  # name: (width, depth, registers, SwiGLU)
    "dinov2_vits14": (384, 12, 0, False), "dinov2_vitb14": (768, 12, 0, False),
    "dinov2_vitl14": (1024, 24, 0, False), "dinov2_vitg14": (1536, 40, 0, True),
    "dinov2_vits14_reg": (384, 12, 4, False), "dinov2_vitb14_reg": (768, 12, 4, False),
    "dinov2_vitl14_reg": (1024, 24, 4, False), "dinov2_vitg14_reg": (1536, 40, 4, True),
}


def hub_load(name: str, **kwargs):
    return torch.hub.load(REPO, name, source="local", **kwargs)


def test_hubconf_declares_every_official_entrypoint():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ["torch"]
    assert set(OFFICIAL) | {"dinoforge_vitt14", "dinoforge_vitt14_reg"} <= set(dir(hubconf))


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_construction_arguments(name):
    width, depth, registers, swiglu = OFFICIAL[name]
    with torch.device("meta"):  # shapes only: even ViT-g costs nothing
        model = hub_load(name)
    assert (model.embed_dim, model.n_blocks, model.num_register_tokens, model.patch_size) == (width, depth,
                                                                                               registers, 14)
    assert model.pos_embed.shape == (1, 37 * 37 + 1, width)  # img_size 518
    assert isinstance(model.blocks[0].mlp, SwiGLUFFN if swiglu else Mlp)
    assert model.blocks[0].ls1.gamma.shape == (width,)  # init_values 1.0: LayerScale present
    # Register models interpolate position embeddings with antialiasing and no legacy offset.
    assert (model.interpolate_antialias, model.interpolate_offset) == ((True, 0.0) if registers else (False, 0.1))


def test_init_values_are_one():
    model = hub_load("dinoforge_vitt14", img_size=56)
    assert torch.all(model.blocks[0].ls1.gamma == 1.0)
    assert model.embed_dim == 192 and model.pos_embed.shape == (1, 17, 192)


def test_hub_load_with_local_official_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = vit_small(patch_size=14, img_size=518, init_values=1.0).eval()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(source.state_dict(), path)
    model = hub_load("dinov2_vits14", weights=str(path)).eval()
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_hub_load_with_our_safetensors_export(tmp_path):
    torch.manual_seed(1)
    source = vit_small(patch_size=14, img_size=518, num_register_tokens=4, interpolate_antialias=True,
                       interpolate_offset=0.0).eval()
    path = save_safetensors(export_official(source), tmp_path / "backbone.safetensors")
    model = hub_load("dinov2_vits14_reg", weights=path).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x)["x_norm_regtokens"],
                                   source.forward_features(x)["x_norm_regtokens"], rtol=0, atol=0)


def test_never_downloads():
    with pytest.raises(ValueError, match="never downloads"):
        hub_load("dinov2_vits14", pretrained=True)
    with pytest.raises(FileNotFoundError, match="not a local file"):
        hub_load("dinov2_vits14", weights="LVD142M")
