"""The ViT family: shapes, key layout, registers, masking, packing, stochastic depth, position interpolation."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from dinoforge.models import ARCHITECTURES, attention, build_vit, vit_giant2, vit_small, vit_tiny
from dinoforge.models.attention import BACKEND_ENV, packed_attention, resolve_backend
from dinoforge.models.drop_path import add_residual_efficient, add_residual_masked
from dinoforge.models.ffn import swiglu_hidden_features
from dinoforge.models.packing import TokenLayout


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return vit_tiny(patch_size=14, img_size=56, num_register_tokens=4, depth=2).eval()


@pytest.mark.parametrize(
    "arch,width,depth,heads", [("vit_tiny", 192, 12, 3), ("vit_small", 384, 12, 6), ("vit_base", 768, 12, 12),
                               ("vit_large", 1024, 24, 16), ("vit_giant2", 1536, 40, 24)])
def test_family_dimensions(arch, width, depth, heads):
    with torch.device("meta"):
        model = build_vit(arch, patch_size=14, img_size=518)
    assert (model.embed_dim, len(model.blocks), model.num_heads) == (width, depth, heads)
    assert width // heads == 64 or arch == "vit_tiny"
    assert model.pos_embed.shape == (1, 37 * 37 + 1, width)


def test_official_key_layout_giant_swiglu_registers():
    with torch.device("meta"):
        model = vit_giant2(patch_size=14, img_size=518, ffn_layer="swiglufused", num_register_tokens=4)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hidden = swiglu_hidden_features(4 * 1536)
    assert hidden == 4096  # the official ViT-g/14 width
    assert shapes["blocks.39.mlp.w12.weight"] == (2 * hidden, 1536)
    assert shapes["blocks.39.mlp.w3.weight"] == (1536, hidden)
    assert shapes["register_tokens"] == (1, 4, 1536)
    assert shapes["mask_token"] == (1, 1536)
    assert shapes["patch_embed.proj.weight"] == (1536, 3, 14, 14)
    expected_block = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                      "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.w12.weight", "mlp.w12.bias",
                      "mlp.w3.weight", "mlp.w3.bias", "ls2.gamma"}
    assert {k[len("blocks.0."):] for k in shapes if k.startswith("blocks.0.")} == expected_block
    assert {k for k in shapes if not k.startswith("blocks.")} == {
        "cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight",
        "patch_embed.proj.bias", "norm.weight", "norm.bias"}


def test_mlp_keys_and_no_layerscale_without_init_values():
    model = vit_tiny(depth=1, init_values=None)
    keys = set(model.state_dict())
    assert "blocks.0.mlp.fc1.weight" in keys and "blocks.0.mlp.fc2.bias" in keys
    assert not any("ls1" in k for k in keys)


def test_forward_features_dict(tiny):
    x = torch.randn(3, 3, 56, 56)
    out = tiny.forward_features(x)
    assert out["x_norm_clstoken"].shape == (3, 192)
    assert out["x_norm_regtokens"].shape == (3, 4, 192)
    assert out["x_norm_patchtokens"].shape == (3, 16, 192)
    assert out["x_prenorm"].shape == (3, 1 + 4 + 16, 192)
    torch.testing.assert_close(tiny(x), out["x_norm_clstoken"])
    torch.testing.assert_close(tiny.norm(out["x_prenorm"])[:, 0], out["x_norm_clstoken"])


def test_registers_follow_cls_without_position_embedding(tiny):
    tokens = tiny.prepare_tokens_with_masks(torch.randn(2, 3, 56, 56))
    torch.testing.assert_close(tokens[:, 1:5], tiny.register_tokens.expand(2, -1, -1))
    assert tokens.shape[1] == 1 + 4 + 16


def test_mask_token_replaces_masked_patches(tiny):
    masks = torch.ones(2, 16, dtype=torch.bool)
    a = tiny.forward_features(torch.randn(2, 3, 56, 56), masks=masks)["x_norm_patchtokens"]
    b = tiny.forward_features(torch.randn(2, 3, 56, 56), masks=masks)["x_norm_patchtokens"]
    torch.testing.assert_close(a, b)  # every patch masked: the image content no longer matters


def test_packed_list_forward_equals_separate_forwards(tiny):
    """DESIGN: one packed pass over crops of different sizes gives what each crop batch gives alone (SDPA, fp32)."""
    torch.manual_seed(1)
    globals_, locals_ = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 42)
    masks = torch.rand(4, 16) < 0.3
    packed = tiny.forward_features([globals_, locals_], masks=[masks, None])
    alone = [tiny.forward_features(globals_, masks=masks), tiny.forward_features(locals_)]
    for p, a in zip(packed, alone, strict=True):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(p[key], a[key], atol=1e-5, rtol=0)
    assert packed[0]["masks"] is masks and packed[1]["masks"] is None


def test_packed_attention_is_block_diagonal_softmax():
    torch.manual_seed(0)
    layout = TokenLayout(((2, 5), (3, 3)))
    q, k, v = (torch.randn(layout.num_tokens, 2, 8) for _ in range(3))
    out = packed_attention(q, k, v, layout, "sdpa")
    start = 0
    for n in layout.seqlens:
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))
        ref = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(8), dim=-1) @ vs
        torch.testing.assert_close(out[start : start + n], ref.transpose(0, 1), atol=1e-6, rtol=1e-5)
        start += n


@pytest.fixture
def fresh_attention_choice():
    """Each test probes and decides anew (the choices are cached per process)."""
    caches = (attention.xformers_status, attention._decide)
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()


def test_attention_backend_selection(monkeypatch, caplog, fresh_attention_choice):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert resolve_backend("auto", cpu) == "sdpa"
        assert resolve_backend("auto", cpu) == "sdpa"
    assert len([r for r in caplog.records if "attention on cpu" in r.message]) == 1  # logged once per choice
    with pytest.raises(RuntimeError, match="xformers' cannot run: xformers runs on CUDA only.*Use 'sdpa'"):
        resolve_backend("xformers", cpu)
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        resolve_backend("flash3", cpu)
    monkeypatch.setenv(BACKEND_ENV, "sdpa")
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        assert resolve_backend("xformers", cpu) == "sdpa"  # the environment overrides the config, and says so
    assert f"{BACKEND_ENV}=sdpa, overriding 'xformers'" in caplog.text


class BrokenXformers:
    """xformers as a wheel built for another torch presents itself: it imports, its operator raises."""

    class fmha:  # noqa: N801 (mirrors the xformers.ops.fmha namespace)
        BlockDiagonalMask = type("BlockDiagonalMask", (), {"from_seqlens": staticmethod(lambda seqlens: seqlens)})

    @staticmethod
    def memory_efficient_attention(q, k, v, attn_bias=None):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs: ...")


def test_auto_picks_sdpa_when_the_xformers_probe_fails(monkeypatch, fresh_attention_choice):
    works, why = attention.probe_xformers(BrokenXformers, torch.device("cpu"), torch.bfloat16)
    assert not works and "NotImplementedError: No operator found" in why
    monkeypatch.setattr(attention, "xformers_status", lambda device, dtype: (works, why))
    cpu = torch.device("cpu")
    backend, reason = attention.choose_backend("auto", cpu, torch.bfloat16)
    assert backend == "sdpa" and "No operator found" in reason
    with pytest.raises(RuntimeError, match="No operator found.*Use 'sdpa' or 'auto'"):
        resolve_backend("xformers", cpu, torch.bfloat16)
    model = vit_small(patch_size=14, img_size=28, depth=1)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 384)  # `auto` still runs


def kernel_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key.lower() for e in prof.key_averages()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_xformers_matches_sdpa_on_cuda(monkeypatch, fresh_attention_choice):
    """Runs each backend for real (the environment override is cleared) and checks which kernels ran."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    works, why = attention.xformers_status(torch.device("cuda", 0), torch.bfloat16)
    if not works:
        pytest.skip(why)
    torch.manual_seed(0)
    model = vit_small(patch_size=14, img_size=224, num_register_tokens=4).cuda().eval()
    crops = [torch.randn(4, 3, 224, 224, device="cuda"), torch.randn(8, 3, 98, 98, device="cuda")]
    results = {}
    for backend, kernel in (("sdpa", ("flash", "cudnn", "efficient", "fmha")), ("xformers", ("fmha", "cutlass"))):
        model.set_attn_backend(backend)
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            names = kernel_names(lambda: results.__setitem__(backend, model.forward_features(crops)))  # noqa: B023
        assert any(k in name for name in names for k in kernel), (backend, sorted(names)[:20])
    for r, g in zip(results["sdpa"], results["xformers"], strict=True):
        torch.testing.assert_close(g["x_norm_patchtokens"].float(), r["x_norm_patchtokens"].float(), atol=3e-2,
                                   rtol=3e-2)


def test_efficient_drop_path_computes_only_kept_samples():
    torch.manual_seed(0)
    layout = TokenLayout(((8, 3), (4, 2)))
    x = torch.randn(layout.num_tokens, 5)
    seen = []

    def branch(t, sub_layout):
        seen.append(sub_layout)
        return 2 * t

    out = add_residual_efficient(x, layout, branch, drop_prob=0.5)
    assert seen[0].groups == ((4, 3), (2, 2))  # the branch ran on half the samples of each group
    changed = ~torch.isclose(out, x).all(dim=1)
    per_sample = [changed[s : s + n].all().item() for s, n in zip(_starts(layout), layout.seqlens, strict=True)]
    assert sum(per_sample[:8]) == 4 and sum(per_sample[8:]) == 2
    rows = changed.nonzero()[:, 0]
    torch.testing.assert_close(out[rows], x[rows] + 2 * 2 * x[rows])  # scaled by B / kept = 2


def test_both_drop_path_forms_are_unbiased():
    torch.manual_seed(0)
    layout = TokenLayout(((10, 2),))
    x = torch.randn(layout.num_tokens, 3)
    for add in (add_residual_efficient, add_residual_masked):
        mean = torch.stack([add(x, layout, lambda t, _: t + 1, 0.3) for _ in range(4000)]).mean(0)
        torch.testing.assert_close(mean, x + (x + 1), atol=0.1, rtol=0.05)


def test_block_uses_efficient_form_only_when_training():
    model = vit_tiny(depth=2, drop_path_rate=0.9, drop_path_uniform=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x))  # eval: deterministic, no drop
    model.train()
    assert not torch.allclose(model(x), model(x))


def _starts(layout):
    starts, s = [], 0
    for n in layout.seqlens:
        starts.append(s)
        s += n
    return starts


def _reference_square_interpolation(pos, n_patches, offset, antialias):
    """The reference's formula for square inputs (its height/width swap does not matter there)."""
    m = math.isqrt(pos.shape[1] - 1)
    if n_patches == m:
        return pos  # the reference returns the stored table as is at its native size
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        s = (n_patches + offset) / m
        grid = F.interpolate(grid, scale_factor=(s, s), mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(n_patches, n_patches), mode="bicubic", antialias=antialias)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True), (0.0, False)])
def test_interpolation_matches_reference_on_square_sizes(offset, antialias):
    model = vit_tiny(patch_size=14, img_size=518, depth=1, interpolate_offset=offset, interpolate_antialias=antialias)
    with torch.no_grad():
        for n in (16, 7, 37):
            got = model.interpolate_pos_encoding(n, n, torch.float32)
            torch.testing.assert_close(got, _reference_square_interpolation(model.pos_embed, n, offset, antialias))


@pytest.mark.parametrize("h,w", [(5, 9), (9, 5), (7, 3), (16, 11)])
def test_interpolation_keeps_rows_as_rows_for_non_square_sizes(h, w):
    model = vit_tiny(patch_size=14, img_size=14 * 8, depth=1, interpolate_offset=0.0)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, 1:, 0] = rows.flatten()
        model.pos_embed[0, 1:, 1] = cols.flatten()
        grid = model.interpolate_pos_encoding(h, w, torch.float32)[0, 1:].reshape(h, w, -1)
    assert (grid[1:, :, 0] > grid[:-1, :, 0]).all() and (grid[:, 1:, 1] > grid[:, :-1, 1]).all()
    assert torch.allclose(grid[:, :, 0], grid[:, :1, 0]) and torch.allclose(grid[:, :, 1], grid[:1, :, 1])
    out = model.forward_features(torch.randn(1, 3, 14 * h, 14 * w))
    assert out["x_norm_patchtokens"].shape == (1, h * w, 192)


def test_intermediate_layers(tiny):
    x = torch.randn(2, 3, 56, 56)
    layers = tiny.get_intermediate_layers(x, n=2, return_class_token=True, norm=True)
    assert len(layers) == 2
    out = tiny.forward_features(x)
    torch.testing.assert_close(layers[-1][0], out["x_norm_patchtokens"])
    torch.testing.assert_close(layers[-1][1], out["x_norm_clstoken"])
    maps = tiny.get_intermediate_layers(x, n=[0], reshape=True)
    assert maps[0].shape == (2, 192, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        tiny.get_intermediate_layers(x, n=[5])


def test_errors_speak_to_the_user():
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        vit_tiny(patch_size=14, depth=1)(torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match="unknown architecture 'vit_huge'"):
        build_vit("vit_huge")
    with pytest.raises(ValueError, match="unknown ffn_layer"):
        vit_tiny(ffn_layer="geglu")
    assert set(ARCHITECTURES) == {"vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"}


def test_patch_8_and_16():
    for p in (8, 16):
        out = vit_tiny(patch_size=p, img_size=64, depth=1).forward_features(torch.randn(1, 3, 64, 64))
        assert out["x_norm_patchtokens"].shape[1] == (64 // p) ** 2
