"""backbone.onnx: ONNX Runtime gives PyTorch's tokens, the batch (and, where the report says so, the image size) is
dynamic, and the same model always gives the same bytes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from test_weights import randomise

import pretrain.onnx_export as onnx_export
from dinoforge.models.vision_transformer import DinoVisionTransformer
from pretrain.onnx_export import OnnxCheckError, export_onnx

IMG = 56


def small_vit(patch: int = 14, registers: int = 0, **kwargs) -> DinoVisionTransformer:
    model = DinoVisionTransformer(img_size=IMG, patch_size=patch, embed_dim=48, depth=2, num_heads=2,
                                  num_register_tokens=registers, init_values=1.0, **kwargs).eval()
    return randomise(model, seed=patch + registers)



@pytest.fixture
def ort():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def run_both(ort, path, model: DinoVisionTransformer, batch: int, size: int, seed: int = 3) -> float:
    """Max |ONNX Runtime - PyTorch| over the outputs, for a fresh seeded batch."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixel_values": x.numpy()}),
                   strict=True))
    with torch.no_grad():
        out = model.forward_features(x)
    expected = {"cls_token": out["x_norm_clstoken"], "patch_tokens": out["x_norm_patchtokens"]}
    if model.num_register_tokens:
        expected["register_tokens"] = out["x_norm_regtokens"]
    assert sorted(got) == sorted(expected)
    assert all(got[k].shape == tuple(v.shape) for k, v in expected.items())
    return max(float(np.abs(got[k] - v.numpy()).max()) for k, v in expected.items())


def test_dynamic_image_size_with_registers(tmp_path, ort):
    """interpolate_offset=0 (DINOv2's register models): the graph resizes position embeddings like PyTorch, so
    height and width stay dynamic."""
    model = small_vit(patch=14, registers=4, interpolate_offset=0.0, interpolate_antialias=True)
    model.train()  # the export works on a copy in eval mode and leaves the caller's model as it was
    report = export_onnx(model, tmp_path / "backbone.onnx", IMG)
    assert model.training and all(blk.attn.backend == "auto" for blk in model.blocks)
    model.eval()
    assert report["dynamic_image_size"] is True and report["fixed_image_size_reason"] is None
    assert report["inputs"] == {"pixel_values": ["batch", 3, "height", "width"]}
    assert report["outputs"] == {"cls_token": ["batch", 48], "patch_tokens": ["batch", "num_patches", 48],
                                 "register_tokens": ["batch", 4, 48]}
    assert report["dynamic_axes"]["pixel_values"] == {"0": "batch", "2": "height", "3": "width"}
    assert report["image_sizes_checked"] == [[56, 56], [84, 84], [56, 84]]
    assert report["opset"] >= 17 and report["file"] == "backbone.onnx"
    assert report["max_abs_diff"] <= 1e-4
    assert report["onnxruntime_version"] == ort.__version__ and report["torch_version"] == torch.__version__
    for batch in (1, 3):
        for size in (IMG, IMG + 3 * 14):
            assert run_both(ort, tmp_path / "backbone.onnx", model, batch, size) <= 1e-4


def test_legacy_offset_gives_a_fixed_image_size(tmp_path, ort):
    """interpolate_offset=0.1 (the default): the graph cannot reproduce the scale-factor resize, so the file takes
    only the release size, and says why."""
    model = small_vit(patch=8, registers=0)
    report = export_onnx(model, tmp_path / "backbone.onnx", IMG)
    assert report["dynamic_image_size"] is False
    assert "interpolate_offset=0.1" in report["fixed_image_size_reason"]
    assert report["inputs"] == {"pixel_values": ["batch", 3, 56, 56]}
    assert report["outputs"] == {"cls_token": ["batch", 48], "patch_tokens": ["batch", 49, 48]}
    assert report["dynamic_axes"] == {k: {"0": "batch"} for k in ("pixel_values", "cls_token", "patch_tokens")}
    assert report["image_sizes_checked"] == [[56, 56]] and report["max_abs_diff"] <= 1e-4
    for batch in (1, 3):
        assert run_both(ort, tmp_path / "backbone.onnx", model, batch, IMG) <= 1e-4
    with pytest.raises(Exception, match="pixel_values"):  # ONNX Runtime refuses another size: fixed, as reported
        run_both(ort, tmp_path / "backbone.onnx", model, 1, IMG + 16)


def test_same_model_same_bytes_whatever_the_attention_setting(tmp_path, ort, monkeypatch):
    model = small_vit(patch=14, registers=0)
    export_onnx(model, tmp_path / "a" / "backbone.onnx", IMG, dynamic_image_size=False)
    # DINOFORGE_ATTENTION overrides the model's choice (xformers cannot run on CPU); the graph holds SDPA regardless
    monkeypatch.setenv("DINOFORGE_ATTENTION", "xformers")
    model.set_attn_backend("xformers")
    export_onnx(model, tmp_path / "b" / "backbone.onnx", IMG, dynamic_image_size=False)
    first, second = (tmp_path / "a" / "backbone.onnx").read_bytes(), (tmp_path / "b" / "backbone.onnx").read_bytes()
    assert first == second
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["backbone.onnx"]  # no temporary file left
    for varying in (str(tmp_path).encode(), b"stack_trace", b".py", b"pkg.torch"):
        assert varying not in first
    import onnx

    graph = onnx.load_from_string(first).graph
    ops = {(node.domain, node.op_type) for node in graph.node}
    assert {domain for domain, _ in ops} == {""}  # standard ONNX only: attention as MatMul + Softmax
    assert {("", "MatMul"), ("", "Softmax")} <= ops


def test_a_mismatch_is_an_error_and_writes_nothing(tmp_path, ort, monkeypatch):
    monkeypatch.setattr(onnx_export, "TOLERANCE", 0.0)  # float rounding alone now counts as a mismatch
    with pytest.raises(OnnxCheckError, match=r"away from PyTorch's \(> 0.0\).*batch.*not written"):
        export_onnx(small_vit(), tmp_path / "backbone.onnx", IMG, dynamic_image_size=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs,pattern", [
    ({"image_size": 50}, "not a positive multiple of the patch size 14"),
    ({"image_size": IMG, "opset": 16}, "opset >= 17"),
])
def test_bad_arguments(tmp_path, ort, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        export_onnx(small_vit(), tmp_path / "backbone.onnx", **kwargs)


def test_without_onnxruntime_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ImportError, match=r"^.*pip install 'dinoforge\[release\]'$") as info:
        export_onnx(small_vit(), tmp_path / "backbone.onnx", IMG)
    assert "\n" not in str(info.value)
