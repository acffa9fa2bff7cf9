"""Our ViT as a Hugging Face folder: transformers loads it without missing or unexpected keys and gives our tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_weights import randomise
from torch import nn

from dinoforge.models.hf_export import hf_config, official_to_hf, write_hf_folder
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.models.weight_layouts import LayoutError, hf_to_official
from dinoforge.models.weights import export_official

transformers = pytest.importorskip("transformers")

IMG = 56


def small_vit(patch: int = 14, registers: int = 0, ffn: str = "mlp", layerscale: float | None = 1.0, dim: int = 48,
              heads: int = 2, img_size: int = IMG, **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(img_size=img_size, patch_size=patch, embed_dim=dim, depth=2, num_heads=heads,
                                 num_register_tokens=registers, ffn_layer=ffn, init_values=layerscale,
                                 **kwargs).eval()



def load_hf(folder):
    model, info = transformers.AutoModel.from_pretrained(str(folder), output_loading_info=True)
    return model.eval(), info


def assert_tokens_match(ours: DinoVisionTransformer, hf, size: int, atol: float = 1e-4) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = hf(pixel_values=x).last_hidden_state
        mine = ours.forward_features(x)
    r = ours.num_register_tokens
    assert tokens.shape == (2, 1 + r + mine["x_norm_patchtokens"].shape[1], ours.embed_dim)
    torch.testing.assert_close(tokens[:, 0], mine["x_norm_clstoken"], rtol=0, atol=atol)
    torch.testing.assert_close(tokens[:, 1:1 + r], mine["x_norm_regtokens"], rtol=0, atol=atol)
    torch.testing.assert_close(tokens[:, 1 + r:], mine["x_norm_patchtokens"], rtol=0, atol=atol)


CASES = {  # patch, registers, ffn, LayerScale, width, heads, extra model arguments
    "p14-mlp-ls": (14, 0, "mlp", 1.0, 48, 2, {}),
    "p14-reg4-mlp-nols": (14, 4, "mlp", None, 48, 2, {}),
    "p8-reg4-swiglu-ls": (8, 4, "swiglufused", 1.0, 64, 2, {}),
    "p8-swiglu-nols-noqkvbias": (8, 0, "swiglufused", None, 192, 3, {"qkv_bias": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_folder_and_matches_our_tokens(tmp_path, case):
    patch, registers, ffn, layerscale, dim, heads, extra = CASES[case]
    model = randomise(small_vit(patch, registers, ffn, layerscale, dim, heads, **extra), seed=len(case))
    write_hf_folder(model, tmp_path / "hf")
    hf, info = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert_tokens_match(model, hf, IMG)


def test_hub_file_names_are_what_save_pretrained_writes(tmp_path):
    """The names and shapes of our file equal those of transformers' own save_pretrained for the same config."""
    for registers, ffn in [(0, "mlp"), (4, "swiglufused")]:
        model = small_vit(registers=registers, ffn=ffn)
        config = hf_config(model)
        reference = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(config.pop("model_type"),
                                                                                         **config))
        reference.save_pretrained(tmp_path / f"ref{registers}")
        with safe_open(str(tmp_path / f"ref{registers}" / "model.safetensors"), "pt") as f:
            expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        ours = {k: tuple(v.shape) for k, v in official_to_hf(export_official(model)).items()}
        assert ours == expected


@pytest.mark.parametrize("registers,ffn,qkv_bias", [(0, "mlp", True), (4, "swiglufused", True), (4, "mlp", False)])
def test_round_trip_through_hugging_face_names_is_exact(registers, ffn, qkv_bias):
    state = export_official(randomise(small_vit(registers=registers, ffn=ffn, qkv_bias=qkv_bias), seed=3))
    back, _ = hf_to_official(official_to_hf(state))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_model_without_layer_scale_gets_lambda_ones():
    state = export_official(small_vit(layerscale=None))
    assert not any(".ls" in k for k in state)
    assert not any("layer_scale" in k for k in official_to_hf(state))  # without filling: still the exact inverse
    filled = official_to_hf(state, fill_layer_scale=True)
    lambdas = {k: v for k, v in filled.items() if k.endswith(".lambda1")}
    assert sorted(lambdas) == [f"encoder.layer.{i}.layer_scale{j}.lambda1" for i in range(2) for j in (1, 2)]
    assert all(torch.equal(v, torch.ones(48)) for v in lambdas.values())


def test_config_is_read_from_the_model():
    config = hf_config(small_vit(patch=14, registers=4, ffn="swiglufused", dim=64, img_size=60))
    assert config["model_type"] == "dinov2_with_registers"
    assert config["architectures"] == ["Dinov2WithRegistersModel"] and config["num_register_tokens"] == 4
    assert config["image_size"] == 56  # the position grid (4 x 4 patches of 14), not the constructor's 60
    assert config["use_swiglu_ffn"] is True and config["mlp_ratio"] == 4 and config["hidden_size"] == 64
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu"
    plain = hf_config(small_vit(patch=8))
    assert plain["model_type"] == "dinov2" and plain["architectures"] == ["Dinov2Model"]
    assert "num_register_tokens" not in plain and plain["patch_size"] == 8 and plain["image_size"] == 56


@pytest.mark.parametrize("kwargs,setting", [
    ({"proj_bias": False}, "proj_bias=False"),
    ({"ffn_bias": False}, "ffn_bias=False"),
    ({"mlp_ratio": 2.5}, "mlp_ratio"),
    ({"ffn_bias": False, "ffn": "swiglufused"}, "ffn_bias=False"),
])
def test_settings_hugging_face_cannot_represent_are_named(tmp_path, kwargs, setting):
    model = small_vit(**kwargs)
    with pytest.raises(ValueError, match=setting):
        write_hf_folder(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


class Gated(nn.Module):
    """An FFN kind Hugging Face DINOv2 does not have."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)


@pytest.mark.parametrize("change,setting", [
    (lambda blk: setattr(blk, "mlp", Gated(48)), "ffn_layer Gated"),
    (lambda blk: setattr(blk.mlp, "act", nn.GELU(approximate="tanh")), "exact GELU"),
])
def test_ffn_hugging_face_lacks_is_named(change, setting):
    model = small_vit()
    for blk in model.blocks:
        change(blk)
    with pytest.raises(ValueError, match=setting):
        hf_config(model)


def test_unknown_official_key_is_named():
    state = export_official(small_vit())
    state["head.weight"] = torch.zeros(2, 48)
    with pytest.raises(LayoutError, match="head.weight"):
        official_to_hf(state)


def test_rewrite_is_byte_identical(tmp_path):
    model = randomise(small_vit(registers=4, ffn="swiglufused", layerscale=None), seed=5)
    first, second = write_hf_folder(model, tmp_path / "a"), write_hf_folder(model, tmp_path / "b")
    files = sorted(p.name for p in first.iterdir())
    assert files == ["config.json", "model.safetensors"] == sorted(p.name for p in second.iterdir())
    before = {name: (first / name).read_bytes() for name in files}
    assert before == {name: (second / name).read_bytes() for name in files}
    write_hf_folder(model, first)  # over an existing folder
    assert before == {name: (first / name).read_bytes() for name in files}
    text = before["config.json"].decode()
    assert text.endswith("}\n") and json.loads(text) == hf_config(model)
    assert list(json.loads(text)) == sorted(json.loads(text))


@pytest.mark.parametrize("registers", [0, 4])
def test_other_sizes_match_when_interpolation_agrees(tmp_path, registers):
    """Off the trained grid both libraries resize position embeddings; they agree for offset 0 and Hugging Face's
    antialiasing choice (none without registers, on with them), as the module docstring says."""
    model = randomise(small_vit(registers=registers, interpolate_offset=0.0,
                                interpolate_antialias=bool(registers)), seed=6)
    write_hf_folder(model, tmp_path / "hf")
    hf, _ = load_hf(tmp_path / "hf")
    assert_tokens_match(model, hf, IMG + 28)
