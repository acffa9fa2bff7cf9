"""Feature extraction on real photos: equal to a direct forward, identical under 2 gloo processes (7 samples, not
divisible by 2, one of them undecodable), cached to disk by a key that changes with weights and data."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_eval_support import imagenette_file_list, one_torch_thread

from dinoforge.data.datasets import build_dataset
from dinoforge.data.transforms import EvalTransformConfig, make_eval_transform
from dinoforge.models.loading import load_backbone, weights_fingerprint
from evaluation.config import BackboneConfig
from evaluation.feature_cache import cache_path, cached_features, dataset_fingerprint, load_features
from evaluation.feature_set import FeatureSet
from evaluation.features import extract_features

TINY = BackboneConfig(weights="random", arch="vit_tiny", patch_size=16, img_size=64, layerscale=1.0, seed=3)
TRANSFORM = EvalTransformConfig(resize_size=72, crop_size=64)
WORLD_SIZE = 2


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def photo_list(tmp_path_factory) -> Path:
    """7 labelled photos; the 4th line is a corrupt file, which the reader replaces by the next readable photo."""
    tmp = tmp_path_factory.mktemp("photos")
    lines = imagenette_file_list(tmp / "all.txt", "val", per_class=1).read_text().splitlines()[:6]
    broken = tmp / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    lines.insert(3, f"{broken} 9")
    out = tmp / "seven.txt"
    out.write_text("\n".join(lines) + "\n")
    return out


def dataset(spec: Path):
    return build_dataset(str(spec), transform=make_eval_transform(TRANSFORM), with_labels=True)


def test_features_equal_a_direct_forward_in_dataset_order(photo_list):
    model = load_backbone(TINY)
    ds = dataset(photo_list)
    fs = extract_features(model, ds, n_last_blocks=4, batch_size=3)
    assert fs.block_cls.shape == (7, 4, 192) and fs.patch_mean.shape == (7, 192)
    assert fs.decode_errors == 1
    images = torch.stack([ds[i][0] for i in range(7)])
    with torch.inference_mode():
        cls = model(images)
        patches = model.forward_features(images)["x_norm_patchtokens"]
        layers = model.get_intermediate_layers(images, n=4, return_class_token=True, norm=True)
    torch.testing.assert_close(fs.cls, cls, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fs.patch_mean, patches.mean(dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fs.block_cls[:, 0], layers[0][1], atol=1e-5, rtol=1e-4)
    # Labels in list order (0, 1, 2, broken, 3, 4, 5): the broken sample is the next photo, label and all.
    assert fs.labels.tolist() == [0, 1, 2, 3, 3, 4, 5]
    assert torch.equal(fs.block_cls[3], fs.block_cls[4])


def _worker(rank: int, port: int, spec: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=120))
    try:
        model = load_backbone(TINY)
        forwards = []
        model.blocks[0].register_forward_hook(lambda *_: forwards.append(1))
        # Batches of 3: rank 0 holds 4 samples (2 batches), rank 1 holds 3 (1 batch, + 1 forward to keep pace).
        fs = extract_features(model, dataset(Path(spec)), n_last_blocks=2, batch_size=3)
        torch.save({"labels": fs.labels, "block_cls": fs.block_cls, "patch_mean": fs.patch_mean,
                    "decode_errors": fs.decode_errors, "forwards": len(forwards)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_give_exactly_the_single_process_features(photo_list, tmp_path):
    single = extract_features(load_backbone(TINY), dataset(photo_list), n_last_blocks=2, batch_size=2)
    mp.spawn(_worker, args=(_free_port(), str(photo_list), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["labels"], single.labels)  # same order, nothing dropped or duplicated
        torch.testing.assert_close(got["block_cls"], single.block_cls, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["patch_mean"], single.patch_mean, atol=1e-6, rtol=1e-5)
        assert got["decode_errors"] == single.decode_errors == 1  # seen by rank 1 only, summed over ranks
        assert got["forwards"] == 2  # equal on both ranks: an FSDP-sharded backbone would not hang


def test_cache_hit_skips_extraction_and_returns_the_same_features(tmp_path):
    fs = FeatureSet(labels=torch.tensor([2, 0, 1]), block_cls=torch.randn(3, 4, 8), patch_mean=torch.randn(3, 8),
                    decode_errors=1)
    key = {"weights": "sha256:abc", "dataset": {"spec": "/data/val"}}
    path = cache_path(tmp_path, "/data/val/", key)
    assert path.parent == tmp_path and path.name.startswith("val-") and path.suffix == ".safetensors"
    calls = []

    def extract() -> FeatureSet:
        calls.append(1)
        return fs

    first = cached_features(path, key, extract)
    second = cached_features(path, key, extract)
    assert len(calls) == 1 and first is fs
    assert torch.equal(second.labels, fs.labels) and torch.equal(second.block_cls, fs.block_cls)
    assert torch.equal(second.patch_mean, fs.patch_mean) and second.decode_errors == 1
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, then renamed
    assert cached_features(None, key, extract) is fs and len(calls) == 2  # no cache dir: always extract


def test_cache_key_follows_weights_and_dataset(tmp_path, photo_list):
    base = {"weights": weights_fingerprint(TINY), "dataset": dataset_fingerprint(str(photo_list), dataset(photo_list))}
    other_seed = {**base, "weights": weights_fingerprint(BackboneConfig(**{**vars(TINY), "seed": 4}))}
    assert cache_path(tmp_path, "x", base) != cache_path(tmp_path, "x", other_seed)

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"one")
    fingerprint = weights_fingerprint(BackboneConfig(weights=str(weights)))
    assert fingerprint.startswith("sha256:")
    weights.write_bytes(b"two")
    assert weights_fingerprint(BackboneConfig(weights=str(weights))) != fingerprint

    edited = tmp_path / "edited.txt"
    edited.write_text(photo_list.read_text())
    before = dataset_fingerprint(str(edited), dataset(edited))
    edited.write_text("\n".join(photo_list.read_text().splitlines()[:5]) + "\n")
    after = dataset_fingerprint(str(edited), dataset(edited))
    assert before["size"] == 7 and after["size"] == 5 and before != after


def test_cache_file_without_feature_tensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"labels": torch.zeros(2, dtype=torch.long)}, str(bad))
    with pytest.raises(ValueError, match="lacks.*delete it"):
        load_features(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_features_close_to_fp32(photo_list):
    model = load_backbone(TINY).cuda()
    ds = dataset(photo_list)
    fp32 = extract_features(model, ds, device="cuda", autocast_dtype="float32")
    bf16 = extract_features(model, ds, device="cuda", autocast_dtype="bfloat16")
    assert bf16.block_cls.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(fp32.cls, bf16.cls, dim=1)
    assert cos.min() > 0.99
