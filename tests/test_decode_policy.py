"""One decoder, one policy: the same file gives the same pixels in curation, training and evaluation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_fixtures import write_tar

from curate.embedding.embed import decode_image as embed_decode
from curate.sources.decode import DecodeLimits, decode_rgb, probe_image
from dinoforge.data.datasets import build_dataset
from dinoforge.data.decode import DEFAULT_POLICY, DecodePolicy, decode_image
from dinoforge.data.transforms import to_rgb as eval_to_rgb
from pretrain.data.streaming import webdataset_stream

ORIENTATION = 0x0112


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))  # 40 wide, 24 high, stored unrotated
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90 degrees clockwise to display": what phones write
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    rgba[:, :10, 3] = 0  # transparent stripe over a random colour
    deep = (np.arange(20 * 32, dtype=np.uint16).reshape(20, 32) * 97).astype(np.uint16)
    palette = Image.fromarray(rng.integers(0, 8, (18, 26), dtype=np.uint8), mode="L").convert("P")
    palette.putpalette([v for i in range(256) for v in (i * 30 % 256, i * 70 % 256, i * 110 % 256)])
    return {
        "exif_rotated.jpg": _encode(photo, "JPEG", exif=exif.tobytes(), quality=95),
        "rgba.png": _encode(Image.fromarray(rgba, mode="RGBA"), "PNG"),
        "grey16.png": _encode(Image.fromarray(deep), "PNG"),
        "palette.png": _encode(palette, "PNG", transparency=3),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], Path, Path]:
    data = _files()
    root = tmp_path_factory.mktemp("policy")
    folder = root / "folder" / "cls"
    folder.mkdir(parents=True)
    for name, payload in data.items():
        (folder / name).write_bytes(payload)
    shard = root / "shard-000000.tar"
    write_tar(shard, [(f"{Path(n).stem}.{Path(n).suffix[1:]}", payload) for n, payload in sorted(data.items())])
    return data, root / "folder", shard


def test_same_file_same_pixels_in_curation_training_and_evaluation(files) -> None:
    data, folder, shard = files
    limits = DecodeLimits(min_side=8)
    names = sorted(data)
    reference = {n: np.asarray(decode_image(data[n])) for n in names}

    # The policy itself: upright, alpha on white, 16-bit scaled (not clipped), palette transparency on white.
    assert reference["exif_rotated.jpg"].shape == (40, 24, 3)
    assert (reference["rgba.png"][:, :10] == 255).all()
    assert 0 < reference["grey16.png"].mean() < 255
    assert reference["grey16.png"].shape == (20, 32, 3)

    paths = {
        "curate ingest probe + report decode": {n: np.asarray(decode_rgb(data[n], limits)) for n in names},
        "curate embed decode": {n: np.asarray(embed_decode(data[n])) for n in names},
        "training ImageFolder": {Path(folder_ds.source.name(i)).name: np.asarray(folder_ds[i][0])
                                 for folder_ds in [build_dataset(folder)] for i in range(len(folder_ds))},
        "training random-access shards": {f"{k.split('.')[0]}": np.asarray(img) for k, img in
                                          _keyed(build_dataset(shard))},
        "training streaming shards": {s["key"]: np.asarray(s["image"]) for s in
                                      webdataset_stream(str(shard), resampled=False, rank=0, world=1, as_dict=True)},
        "evaluation transform on PIL images": {n: np.asarray(eval_to_rgb(Image.open(io.BytesIO(data[n]))))
                                               for n in names},
    }
    for n in names:
        assert probe_image(data[n], limits).ok
    for path, decoded in paths.items():
        for n in names:
            got = decoded.get(n, decoded.get(Path(n).stem))
            assert got is not None, f"{path}: {n} missing ({sorted(decoded)})"
            np.testing.assert_array_equal(got, reference[n], err_msg=f"{path}: {n}")


def _keyed(dataset) -> list[tuple[str, Image.Image]]:
    return [(dataset.source.keys[i], dataset[i][0]) for i in range(len(dataset))]


def test_policy_is_an_argument_not_a_copy() -> None:
    data = _files()
    assert DEFAULT_POLICY == DecodePolicy(exif=True, alpha="white")
    unrotated = decode_image(data["exif_rotated.jpg"], DecodePolicy(exif=False))
    assert unrotated.size == (40, 24)
    dropped = np.asarray(decode_image(data["rgba.png"], DecodePolicy(alpha="drop")))
    assert not (dropped[:, :10] == 255).all()
    with pytest.raises(ValueError, match="alpha"):
        DecodePolicy(alpha="black")
