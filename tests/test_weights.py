"""Weights interchange: every layout converts to the official one, loads strictly and reproduces the source model."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors import safe_open
from torch import nn

from dinoforge.models.heads import DINOHead
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.models.weight_check import summarise_keys
from dinoforge.models.weight_layouts import CHUNKED, HF, OFFICIAL, TIMM, LayoutError, detect_layout
from dinoforge.models.weights import (
    CheckpointError,
    CheckpointMismatchError,
    export_official,
    load_heads,
    load_pretrained,
    save_safetensors,
)

IMG, PATCH = 56, 14
# The official layout of one block and of the embeddings (facebookresearch/dinov2 hub checkpoints).
OFFICIAL_BLOCK_KEYS = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                       "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "ls2.gamma"}
OFFICIAL_TOP_KEYS = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                     "norm.weight", "norm.bias"}


class NotATensor:
    """Stands for any pickled object that needs code to rebuild."""


def small_vit(depth: int = 2, registers: int = 0, ffn: str = "mlp", img_size: int = IMG, dim: int = 48,
              **kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(img_size=img_size, patch_size=PATCH, embed_dim=dim, depth=depth, num_heads=2,
                                 num_register_tokens=registers, ffn_layer=ffn, interpolate_offset=0.0,
                                 **kwargs).eval()


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (init leaves LayerScale, norms and tokens nearly constant, which would hide swaps)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


def features(model: DinoVisionTransformer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.forward_features(x)


def assert_same_outputs(a: DinoVisionTransformer, b: DinoVisionTransformer, size: int = IMG) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    fa, fb = features(a, x), features(b, x)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        torch.testing.assert_close(fa[key], fb[key], rtol=0, atol=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))


# -- official layout and our export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("registers,ffn", [(0, "mlp"), (4, "swiglufused")])
def test_export_official_has_exactly_the_official_keys(registers, ffn):
    state = export_official(small_vit(depth=2, registers=registers, ffn=ffn))
    mlp = {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"} if ffn == "mlp" else \
        {"mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias"}
    expected = OFFICIAL_TOP_KEYS | ({"register_tokens"} if registers else set())
    expected |= {f"blocks.{i}.{k}" for i in range(2) for k in OFFICIAL_BLOCK_KEYS | mlp}
    assert set(state) == expected
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in state.values())
    assert state["mask_token"].shape == (1, 48) and state["pos_embed"].shape == (1, 1 + 16, 48)


def test_export_strips_wrapper_names():
    class DataParallelLike(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = small_vit()
    assert set(export_official(DataParallelLike(model))) == set(export_official(model))


@pytest.mark.parametrize("registers,ffn", [(0, "mlp"), (4, "mlp"), (4, "swiglufused")])
def test_safetensors_round_trip(tmp_path, registers, ffn):
    source = randomise(small_vit(registers=registers, ffn=ffn), seed=0)
    path = save_safetensors(export_official(source), tmp_path / "out" / "backbone.safetensors",
                            metadata={"arch": "vit_small"})
    assert [p.name for p in path.parent.iterdir()] == ["backbone.safetensors"]  # no temporary file left
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["arch"] == "vit_small"
    target = small_vit(registers=registers, ffn=ffn)
    result = load_pretrained(target, path)
    assert result.layout == OFFICIAL and result.notes == ()
    assert_same_outputs(source, target)


def test_save_safetensors_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError, match="json.dumps"):
        save_safetensors(export_official(small_vit()), tmp_path / "x.safetensors", metadata={"epochs": 3})


def test_official_pth_and_meta_model(tmp_path):
    source = randomise(small_vit(registers=4), seed=1)
    torch.save(source.state_dict(), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    with torch.device("meta"):
        target = small_vit(registers=4)
    load_pretrained(target, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    assert not any(p.is_meta for p in target.parameters())
    assert_same_outputs(source, target)


# -- DINOv2 training checkpoints ------------------------------------------------------------------------------------


def chunked(state: dict, depth: int, block_chunks: int) -> dict:
    """DINOv2's BlockChunk naming: chunk c holds blocks [c*s, (c+1)*s) under their global index (s = depth/chunks)."""
    size = depth // block_chunks
    return {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // size}.{m[1]}.", k): v
            for k, v in state.items()}


def training_teacher(model: DinoVisionTransformer, depth: int) -> dict:
    heads = {"dino_head": DINOHead(48, 32, hidden_dim=16, bottleneck_dim=8),
             "ibot_head": DINOHead(48, 24, hidden_dim=16, bottleneck_dim=8)}
    state = {f"backbone.{k}": v for k, v in chunked(model.state_dict(), depth, 4).items()}
    for name, head in heads.items():
        state.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    return state


def test_chunk_naming_matches_dinov2():
    keys = chunked(small_vit(depth=8).state_dict(), depth=8, block_chunks=4)
    assert "blocks.2.5.norm1.weight" in keys and "blocks.3.7.mlp.fc2.bias" in keys and "blocks.0.0.ls1.gamma" in keys
    assert detect_layout(keys) == CHUNKED


def test_training_teacher_checkpoint_needs_ignore_heads(tmp_path):
    source = randomise(small_vit(depth=8), seed=2)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": training_teacher(source, depth=8)}, path)
    target = small_vit(depth=8)
    before = export_official(target)["blocks.0.attn.qkv.weight"].clone()
    with pytest.raises(CheckpointError, match=r"dino_head \(\d+ tensors\), ibot_head .*ignore_heads=True"):
        load_pretrained(target, path)
    assert torch.equal(target.blocks[0].attn.qkv.weight, before)  # nothing loaded on error
    result = load_pretrained(target, path, ignore_heads=True)
    assert result.layout == CHUNKED and result.ignored_heads == ("dino_head", "ibot_head")
    assert_same_outputs(source, target)


def test_load_heads_into_head_modules(tmp_path):
    source = randomise(small_vit(depth=8), seed=3)
    teacher = training_teacher(source, depth=8)
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    heads = load_heads(tmp_path / "teacher_checkpoint.pth")
    assert sorted(heads) == ["dino_head", "ibot_head"]
    head = DINOHead(48, 32, hidden_dim=16, bottleneck_dim=8)
    head.load_state_dict(heads["dino_head"], strict=True)
    assert torch.equal(head.last_layer.weight_v, teacher["dino_head.last_layer.weight_v"])
    with pytest.raises(CheckpointError, match="no heads"):
        load_heads(export_official(source))


def test_load_heads_renames_parametrized_weight_norm():
    state = {"dino_head.mlp.0.weight": torch.ones(2, 2),
             "dino_head.last_layer.parametrizations.weight.original0": torch.ones(3, 1),
             "dino_head.last_layer.parametrizations.weight.original1": torch.ones(3, 2)}
    assert set(load_heads(state)["dino_head"]) == {"mlp.0.weight", "last_layer.weight_g", "last_layer.weight_v"}


def test_other_training_modules_are_always_unexpected():
    state = training_teacher(small_vit(depth=8), depth=8)
    state["dino_loss.center"] = torch.zeros(1, 32)
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(small_vit(depth=8), state, ignore_heads=True)
    assert info.value.unexpected == ["dino_loss.center"] and not info.value.missing


def test_full_training_checkpoint_teacher_by_default_student_on_request(tmp_path):
    teacher, student = randomise(small_vit(), seed=4), randomise(small_vit(), seed=5)
    model_state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    model_state.update({f"student.backbone.{k}": v for k, v in student.state_dict().items()})
    model_state["dino_loss.center"] = torch.zeros(1, 8)
    path = tmp_path / "model_0000099.pth"
    torch.save({"model": model_state, "optimizer": {"state": {}, "param_groups": []}, "iteration": 99}, path)
    target = small_vit()
    load_pretrained(target, path)
    assert_same_outputs(teacher, target)
    load_pretrained(target, path, checkpoint_key="model.student")
    assert_same_outputs(student, target)


def test_ddp_and_compile_prefixes_are_stripped():
    source = randomise(small_vit(), seed=6)
    state = {f"module.{k}".replace("blocks.1.", "blocks.1._orig_mod."): v for k, v in source.state_dict().items()}
    target = small_vit()
    load_pretrained(target, state)
    assert_same_outputs(source, target)


# -- timm -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,registers,ffn", [
    ("vit_small_patch14_dinov2", 0, "mlp"),
    ("vit_small_patch14_reg4_dinov2", 4, "mlp"),
    ("vit_giant_patch14_dinov2", 0, "swiglufused"),
    ("vit_giant_patch14_reg4_dinov2", 4, "swiglufused"),
])
def test_timm_dinov2_outputs_match(name, registers, ffn, images):
    # Width 48: timm's ViT-g MLP ratio and DINOv2's SwiGLU rounding give the same hidden width (128) only when
    # 8*D/3 is a multiple of 8, as for the real 1536.
    reference = randomise(timm.create_model(name, pretrained=False, depth=2, embed_dim=48, num_heads=2,
                                            img_size=IMG).eval(), seed=8)
    model = small_vit(registers=registers, ffn=ffn)
    result = load_pretrained(model, reference.state_dict())
    assert result.layout == TIMM
    assert any("mask_token" in note for note in result.notes)
    with torch.no_grad():
        tokens = reference.forward_features(images)
    ours = features(model, images)
    prefix = reference.num_prefix_tokens
    torch.testing.assert_close(ours["x_norm_clstoken"], tokens[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["x_norm_regtokens"], tokens[:, 1:prefix], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["x_norm_patchtokens"], tokens[:, prefix:], rtol=0, atol=1e-5)


# -- Hugging Face ---------------------------------------------------------------------------------------------------


def hf_model(registers: int, swiglu: bool):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=IMG, patch_size=PATCH,
                  use_swiglu_ffn=swiglu)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
        return randomise(transformers.Dinov2WithRegistersModel(config).eval(), seed=9)
    return randomise(transformers.Dinov2Model(transformers.Dinov2Config(**kwargs)).eval(), seed=9)


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True), (4, True)])
@pytest.mark.parametrize("stored", ["in_memory", "hub_file"])
def test_hugging_face_dinov2_outputs_match(tmp_path, images, registers, swiglu, stored):
    reference = hf_model(registers, swiglu)
    if stored == "hub_file":
        # save_pretrained writes the names of the hub files (transformers 4: attention.attention.query, weights_in).
        reference.save_pretrained(tmp_path)
        source = tmp_path / "model.safetensors"
        with safe_open(str(source), "pt") as f:
            assert any(".attention.attention.query." in k for k in f.keys())
    else:
        source = reference.state_dict()
    model = small_vit(registers=registers, ffn="swiglufused" if swiglu else "mlp")
    assert load_pretrained(model, source).layout == HF
    with torch.no_grad():
        tokens = reference(pixel_values=images).last_hidden_state
    ours = features(model, images)
    torch.testing.assert_close(ours["x_norm_clstoken"], tokens[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["x_norm_regtokens"], tokens[:, 1:1 + registers], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["x_norm_patchtokens"], tokens[:, 1 + registers:], rtol=0, atol=1e-5)


def test_hugging_face_incomplete_qkv_is_an_error():
    state = hf_model(0, False).state_dict()
    del state["encoder.layer.1.attention.k_proj.weight"]
    with pytest.raises(LayoutError, match="encoder.layer.1.attention.q_proj.weight"):
        load_pretrained(small_vit(), state)


# -- strictness and errors ------------------------------------------------------------------------------------------


def test_mismatch_lists_every_difference_with_hints():
    state = export_official(small_vit(depth=2, registers=4))
    model = small_vit(depth=3, registers=0, ffn="swiglufused", img_size=28)
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(model, state)
    err = info.value
    assert set(err.missing) == set(model.state_dict()) - set(state)
    assert set(err.unexpected) == set(state) - set(model.state_dict())
    assert err.mismatched == [("pos_embed", (1, 17, 48), (1, 5, 48))]
    message = str(err)
    for text in ("blocks.[0-2].mlp.w12.weight", "register_tokens", "num_register_tokens=4", "ffn_layer='mlp'",
                 "img_size=56 or pass interpolate_pos_embed=True", "2 blocks, the model 3"):
        assert text in message


def test_interpolated_pos_embed_equals_runtime_interpolation():
    source = randomise(small_vit(registers=4, interpolate_antialias=True), seed=10)
    target = small_vit(registers=4, interpolate_antialias=True, img_size=28)
    with pytest.raises(CheckpointMismatchError, match="interpolate_pos_embed=True"):
        load_pretrained(target, export_official(source))
    result = load_pretrained(target, export_official(source), interpolate_pos_embed=True)
    assert target.pos_embed.shape == (1, 5, 48) and "pos_embed interpolated to 4 patches" in result.notes
    assert_same_outputs_at(source, target, size=28)


def assert_same_outputs_at(a, b, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(features(a, x)["x_norm_patchtokens"], features(b, x)["x_norm_patchtokens"],
                               rtol=0, atol=1e-6)


def test_pickle_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": small_vit().state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="never do"):
        load_pretrained(small_vit(), path)


@pytest.mark.parametrize("name,error,pattern", [
    ("weights.npz", CheckpointError, "unknown weights format"),
    ("missing.pth", FileNotFoundError, "does not exist"),
    ("folder", CheckpointError, "is a directory"),
])
def test_bad_paths(tmp_path, name, error, pattern):
    path = tmp_path / name
    if name == "folder":
        path.mkdir()
    elif name.endswith(".npz"):
        path.write_bytes(b"x")
    with pytest.raises(error, match=pattern):
        load_pretrained(small_vit(), path)


@pytest.mark.parametrize("name,content,pattern", [
    ("notes.pth", b"hello, not a checkpoint\n", "notes.pth is not a torch checkpoint; expected a file written by "
                                                "torch.save"),
    ("empty.pt", b"", "empty.pt is not a torch checkpoint"),
    ("garbage.safetensors", b"garbage garbage garbage", "garbage.safetensors is not a safetensors file .*expected "
                                                        "weights saved with safetensors"),
])
def test_files_that_are_not_weights_name_what_was_expected(tmp_path, name, content, pattern):
    """torch.load raises KeyError on a text file and safetensors its own SafetensorError: neither names the file."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=pattern):
        load_pretrained(small_vit(), path)


def test_container_without_a_state_dict_names_its_keys():
    with pytest.raises(CheckpointError, match=r"top-level keys \['epoch', 'weights'\].*checkpoint_key="):
        load_pretrained(small_vit(), {"weights": {"a": {"b": torch.zeros(1)}}, "epoch": 3})
    with pytest.raises(CheckpointError, match="no key or key prefix 'ema'"):
        load_pretrained(small_vit(), export_official(small_vit()), checkpoint_key="ema")


def test_sharded_fsdp_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="sharded FSDP"):
        load_pretrained(small_vit(), {"_fsdp_wrapped_module._flat_param": torch.zeros(10)})


def test_detect_layout():
    official = export_official(small_vit())
    assert detect_layout(official) == OFFICIAL
    assert detect_layout({k: v for k, v in official.items() if k != "mask_token"}) == TIMM
    assert detect_layout({"embeddings.cls_token": torch.zeros(1, 1, 4)}) == HF


def test_summarise_keys_folds_block_ranges():
    keys = [f"blocks.{i}.norm1.weight" for i in (0, 1, 2, 5)] + ["pos_embed", "blocks.7.ls1.gamma"]
    assert summarise_keys(keys) == ["pos_embed", "blocks.[0-2,5].norm1.weight", "blocks.7.ls1.gamma"]


def test_source_type_is_checked():
    with pytest.raises(TypeError, match="path or a state dict"):
        load_pretrained(small_vit(), 3)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_into_a_cuda_model(tmp_path):
    source = randomise(small_vit(registers=4), seed=11)
    path = save_safetensors(export_official(source), tmp_path / "backbone.safetensors")
    target = small_vit(registers=4).cuda()
    load_pretrained(target, path)
    assert all(torch.equal(v.cpu(), source.state_dict()[k]) for k, v in target.state_dict().items())
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(features(target, x.cuda())["x_norm_clstoken"].cpu(),
                               features(source, x)["x_norm_clstoken"], rtol=0, atol=5e-3)
