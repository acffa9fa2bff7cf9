"""Embedders: output contract (float16, unit norm, dim), the copydetect descriptor's invariances on real photos,
equality with the underlying models, and the threaded `embed_images` loop."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from curate_photos import photo_paths
from PIL import Image, ImageOps

from curate.dedup.config import COPYDETECT_THRESHOLDS
from curate.embedding.copydetect import CopyDetectDescriptor
from curate.embedding.embed import EmbedConfig, build_embedder, decode_image, embed_images
from dinoforge.config import ConfigError


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [p.read_bytes() for p in photo_paths("imagenette", "val", per_class=1)] + \
        [p.read_bytes() for p in photo_paths("imagewoof", "val", per_class=1)]


@pytest.fixture(scope="module")
def copydetect():
    return build_embedder(EmbedConfig(kind="copydetect", device="cpu"))


def jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.astype(np.float32) @ b.astype(np.float32))


def test_copydetect_output_contract(copydetect, photos):
    emb = embed_images(copydetect, photos, batch_size=8, num_workers=0, progress=False)
    assert emb.dtype == np.float16 and emb.shape == (len(photos), copydetect.dim)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert copydetect.name == "copydetect-v1"


def test_copydetect_is_exactly_flip_invariant(photos):
    desc = CopyDetectDescriptor()
    x = torch.stack([desc.transform(decode_image(b)) for b in photos[:6]])
    np.testing.assert_allclose(desc(x).numpy(), desc(x.flip(-1)).numpy(), atol=1e-5)


def test_copydetect_matches_copies_not_other_photos(copydetect, photos):
    originals = [decode_image(b) for b in photos[:10]]
    copies = []
    for i, image in enumerate(originals):
        w, h = image.size
        edited = image.crop((w // 20, 0, w // 20 + int(0.9 * w), int(0.9 * h))) if i % 2 else image
        edited = edited.resize((int(edited.width * 0.6), int(edited.height * 0.6)), Image.BICUBIC)
        copies.append(jpeg(ImageOps.mirror(edited) if i % 3 == 0 else edited, quality=35))
    a = embed_images(copydetect, originals, 16, 0, progress=False)
    b = embed_images(copydetect, copies, 16, 0, progress=False)
    sims = a.astype(np.float32) @ b.astype(np.float32).T
    threshold = COPYDETECT_THRESHOLDS[0]  # the dedup default under this embedding
    assert (np.diag(sims) >= threshold).all()
    assert (sims[~np.eye(10, dtype=bool)] < threshold).all()


def test_embed_images_order_inputs_and_threads(copydetect, photos):
    images = [decode_image(b) for b in photos[:9]]
    serial = embed_images(copydetect, photos[:9], batch_size=4, num_workers=0, progress=False)
    threaded = embed_images(copydetect, iter(photos[:9]), batch_size=4, num_workers=3, progress=False)
    from_pil = embed_images(copydetect, images, batch_size=9, num_workers=2, progress=False)
    np.testing.assert_array_equal(serial, threaded)
    np.testing.assert_array_equal(serial, from_pil)
    one_by_one = np.concatenate([embed_images(copydetect, [b], 1, 0, progress=False) for b in photos[:3]])
    np.testing.assert_array_equal(serial[:3], one_by_one)
    assert embed_images(copydetect, [], 4, 2, progress=False).shape == (0, copydetect.dim)
    with pytest.raises(ValueError, match="image #2 of the input cannot be embedded"):
        embed_images(copydetect, [*photos[:2], b"not an image"], 4, 2, progress=False)


def test_decode_image_modes():
    for mode in ("L", "RGBA", "P", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (20, 10)).save(buf, format="PNG" if mode != "CMYK" else "JPEG")
        assert decode_image(buf.getvalue()).mode == "RGB"
    assert decode_image(Image.new("L", (4, 4))).size == (4, 4)
    deep = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))  # 16-bit grey: scaled, not clipped to white
    assert deep.mode == "I;16" and decode_image(deep).getpixel((0, 0)) == (155, 155, 155)
    with pytest.raises(TypeError, match="PIL image or encoded bytes"):
        decode_image("path/to/file.jpg")


def _tiny_vit():
    from dinoforge.models import vit_tiny

    return vit_tiny(patch_size=16, img_size=64, depth=2).eval()


def test_random_vit_is_seeded_and_matches_the_model(photos):
    cfg = EmbedConfig(kind="random_vit", arch="vit_tiny", patch_size=16, image_size=32, device="cpu", seed=3)
    emb = build_embedder(cfg)
    assert emb.dim == 192 and emb.name == "random_vit-vit_tiny16-seed3-32"
    images = [decode_image(p) for p in photos[:4]]
    a = embed_images(emb, images, 4, 0, progress=False)
    b = embed_images(build_embedder(cfg), images, 4, 0, progress=False)
    c = embed_images(build_embedder(EmbedConfig(kind="random_vit", arch="vit_tiny", patch_size=16, image_size=32,
                                                device="cpu", seed=4)), images, 4, 0, progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    x = torch.stack([emb.transform(image) for image in images])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(emb._forward(x), dim=-1).numpy()
    np.testing.assert_allclose(a.astype(np.float32), expected, atol=2e-3)


def test_dinov2_embedder_loads_weights_strictly(tmp_path, photos):
    model = _tiny_vit()
    path = tmp_path / "tiny_vit.pth"
    torch.save(model.state_dict(), path)
    # The weights carry a 64 px position grid; the embedder runs at 64 px like the model.
    cfg = EmbedConfig(kind="dinov2", arch="vit_tiny", patch_size=16, image_size=64, weights=str(path), device="cpu")
    from dinoforge.models import CheckpointMismatchError, vit_tiny

    with pytest.raises(CheckpointMismatchError):
        build_embedder(cfg)  # vit_tiny has 12 blocks, the file 2: a strict load refuses it

    full = vit_tiny(patch_size=16, img_size=64).eval()
    torch.save(full.state_dict(), path)
    emb = build_embedder(cfg)
    assert emb.name == "dinov2-vit_tiny16-tiny_vit-64" and emb.dim == 192
    images = [decode_image(p) for p in photos[:3]]
    out = embed_images(emb, images, 3, 0, progress=False)
    x = torch.stack([emb.transform(image) for image in images])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(full(x), dim=-1).numpy()
    np.testing.assert_allclose(out.astype(np.float32), expected, atol=2e-3)
    # Another input size: the stored 4x4 position grid is interpolated to 2x2.
    small = build_embedder(EmbedConfig(kind="dinov2", arch="vit_tiny", patch_size=16, image_size=32,
                                       weights=str(path), device="cpu"))
    assert embed_images(small, photos[:2], 2, 0, progress=False).shape == (2, 192)


@pytest.mark.parametrize("size", [-1, 8, 15])
def test_image_size_is_at_least_16_or_0_for_the_models_own(size):
    with pytest.raises(ValueError, match="embed.image_size >= 16"):
        EmbedConfig(image_size=size)
    assert EmbedConfig(image_size=16).image_size == 16 and EmbedConfig().image_size == 0


def test_dinov2_embedder_needs_weights():
    with pytest.raises(ValueError, match="needs embed.weights"):
        build_embedder(EmbedConfig(kind="dinov2", device="cpu"))
    with pytest.raises(FileNotFoundError, match="weights file not found: /nonexistent/w.pth \\(embed.weights takes"):
        build_embedder(EmbedConfig(kind="dinov2", weights="/nonexistent/w.pth", device="cpu"))


def test_open_clip_embedder_from_local_weights(tmp_path, photos):
    import open_clip

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "dinoforge-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "dinoforge-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("dinoforge-tiny-clip")
    weights = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    emb = build_embedder(EmbedConfig(kind="open_clip", open_clip_model="dinoforge-tiny-clip",
                                     open_clip_pretrained=str(weights), device="cpu"))
    assert emb.dim == 32 and emb.name == "open_clip-dinoforge-tiny-clip-tiny_clip"
    images = [decode_image(p) for p in photos[:3]]
    out = embed_images(emb, images, 3, 0, progress=False)
    x = torch.stack([emb.transform(image) for image in images])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.eval().encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(out.astype(np.float32), expected, atol=2e-3)
    with pytest.raises(FileNotFoundError, match="local weights file"):
        build_embedder(EmbedConfig(kind="open_clip", open_clip_pretrained="", device="cpu"))


def test_embed_config_validation():
    with pytest.raises(ValueError, match="embed.kind"):
        EmbedConfig(kind="sscd")
    with pytest.raises(ValueError, match="batch_size"):
        EmbedConfig(batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            build_embedder(EmbedConfig(device="cuda"))


@pytest.mark.gpu
def test_copydetect_on_cuda_matches_cpu(photos):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = embed_images(build_embedder(EmbedConfig(device="cpu")), photos, 8, 0, progress=False)
    gpu = embed_images(build_embedder(EmbedConfig(device="cuda")), photos, 8, 0, progress=False)
    assert (np.einsum("nd,nd->n", cpu.astype(np.float32), gpu.astype(np.float32)) > 0.999).all()
