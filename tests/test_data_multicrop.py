"""Multi-crop augmentation: crop sizes, value ranges, determinism, and blur/solarize rates measured per mode."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image
from test_data_fixtures import image_files, imagenette_subset
from torchvision.transforms import v2

from dinoforge.config import ConfigError, load_config
from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.data.multicrop import (
    MultiCropAugmentation,
    MultiCropConfig,
    blur_probabilities,
)

SMALL = {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 3}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(image_files(imagenette_subset())[0]) as image:
        return image.convert("RGB")


def test_default_config_is_dinov2() -> None:
    cfg = MultiCropConfig()
    assert (cfg.global_crops_scale, cfg.local_crops_scale) == ((0.32, 1.0), (0.05, 0.32))
    assert (cfg.local_crops_number, cfg.global_crops_size, cfg.local_crops_size) == (8, 224, 96)
    assert cfg.blur_semantics == "standard"


def test_crop_shapes_dtype_and_value_range(photo: Image.Image) -> None:
    torch.manual_seed(0)
    out = MultiCropAugmentation(MultiCropConfig())(photo)
    assert [t.shape for t in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 96, 96)] * 8
    low = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]).view(3, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]).view(3, 1, 1)
    for crop in out["global_crops"] + out["local_crops"]:
        assert crop.dtype == torch.float32
        assert bool(((crop >= low - 1e-5) & (crop <= high + 1e-5)).all())
    assert all(crop.std() > 0.05 for crop in out["global_crops"])  # real content, not a constant image


def test_same_seed_same_crops_other_seed_other_crops(photo: Image.Image) -> None:
    aug = MultiCropAugmentation(MultiCropConfig(**SMALL))

    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        out = aug(photo)
        return out["global_crops"] + out["local_crops"]

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_blur_probability_tables() -> None:
    assert blur_probabilities("standard") == (1.0, 0.1, 0.5)
    assert blur_probabilities("dinov2_legacy") == (0.0, 0.9, 0.5)
    with pytest.raises(ValueError, match="blur_semantics must be one of"):
        blur_probabilities("paper")


def measure_rates(monkeypatch, aug: MultiCropAugmentation, photo: Image.Image, n: int) -> dict[str, float]:
    """Per crop kind, the fraction of crops that were really blurred / solarised over `n` augmentations."""
    applied: Counter[str] = Counter()
    names = {id(aug.blur_global1.transforms[0]): "blur_global1", id(aug.blur_global2.transforms[0]): "blur_global2"}
    names[id(aug.blur_local.transforms[0])] = "blur_local"
    names[id(aug.solarize)] = "solarize"
    blur_transform, solarize_transform = v2.GaussianBlur.transform, v2.RandomSolarize.transform

    def record_blur(self, inpt, params):
        applied[names[id(self)]] += 1
        return blur_transform(self, inpt, params)

    def record_solarize(self, inpt, params):
        applied[names[id(self)]] += 1
        return solarize_transform(self, inpt, params)

    monkeypatch.setattr(v2.GaussianBlur, "transform", record_blur)
    monkeypatch.setattr(v2.RandomSolarize, "transform", record_solarize)
    torch.manual_seed(0)
    for _ in range(n):
        aug(photo)
    n_local = n * aug.cfg.local_crops_number
    return {
        "global1": applied["blur_global1"] / n,
        "global2": applied["blur_global2"] / n,
        "local": applied["blur_local"] / n_local,
        "solarize": applied["solarize"] / n,
    }


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("standard", (1.0, 0.1, 0.5)), ("dinov2_legacy", (0.0, 0.9, 0.5))],
)
def test_blur_and_solarize_rates_measured(monkeypatch, photo: Image.Image, mode: str, expected) -> None:
    n = 300  # binomial std <= 0.029 per global rate, 0.017 for locals; tolerances are > 2.5 std
    small = photo.resize((40, 40))
    rates = measure_rates(monkeypatch, MultiCropAugmentation(MultiCropConfig(**SMALL, blur_semantics=mode)), small, n)
    assert rates["global1"] == expected[0]  # 0 and 1 are exact
    assert abs(rates["global2"] - expected[1]) < 0.06
    assert abs(rates["local"] - expected[2]) < 0.06
    assert abs(rates["solarize"] - 0.2) < 0.08  # only the second global crop owns a solarize transform


def test_augmentation_parameters_are_the_papers() -> None:
    aug = MultiCropAugmentation(MultiCropConfig())
    crop_global, flip = aug.geometric_global.transforms
    assert crop_global.scale == (0.32, 1.0) and crop_global.size == (224, 224) and flip.p == 0.5
    assert aug.geometric_local.transforms[0].scale == (0.05, 0.32)
    jitter_apply, grayscale = aug.global1.transforms[:2]
    jitter = jitter_apply.transforms[0]
    assert jitter_apply.p == 0.8 and grayscale.p == 0.2
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4),
        (0.6, 1.4),
        (0.8, 1.2),
        (-0.1, 0.1),
    )
    blur = aug.blur_global2.transforms[0]
    assert blur.kernel_size == (9, 9) and blur.sigma == [0.1, 2.0]
    assert aug.solarize.threshold == 128 and aug.solarize.p == 0.2
    solarizers = [t for pipe in (aug.global1, aug.local) for t in pipe.transforms if isinstance(t, v2.RandomSolarize)]
    assert solarizers == []


def test_config_loads_through_the_strict_loader(tmp_path) -> None:
    path = tmp_path / "mc.yaml"
    path.write_text("local_crops_number: 6\nglobal_crops_scale: [0.4, 1.0]\n")
    cfg = load_config(MultiCropConfig, path, ["blur_semantics=dinov2_legacy"])
    assert cfg.local_crops_number == 6 and tuple(cfg.global_crops_scale) == (0.4, 1.0)
    assert cfg.blur_semantics == "dinov2_legacy"
    with pytest.raises(ConfigError, match="blur_semantic"):
        load_config(MultiCropConfig, None, ["blur_semantic=standard"])
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropConfig(global_crops_scale=(0.5, 0.2))


def test_blur_sigma_sets_the_range_and_a_kernel_of_two_sigmas() -> None:
    aug = MultiCropAugmentation(MultiCropConfig(**SMALL, blur_sigma=(0.05, 0.43)))
    for blur_apply in (aug.blur_global1, aug.blur_global2, aug.blur_local):
        blur = blur_apply.transforms[0]
        assert blur.kernel_size == (3, 3) and blur.sigma == [0.05, 0.43]
    with pytest.raises(ValueError, match="blur_sigma"):
        MultiCropConfig(blur_sigma=(0.5, 0.2))


def test_a_scaled_sigma_keeps_more_of_a_small_crops_detail(photo: Image.Image) -> None:
    """Global crop 1's blur (always applied) at the paper's 0.1-2 px wipes out the fine detail of a 48 px crop that
    the range scaled by 48 / 224 keeps; detail = mean horizontal gradient, averaged over 20 draws of sigma."""
    crop = photo.resize((48, 48))

    def detail(sigma: tuple[float, float] | None) -> float:
        if sigma is None:
            image = v2.functional.pil_to_tensor(crop).float()
        else:
            blur = MultiCropAugmentation(MultiCropConfig(**SMALL, blur_sigma=sigma)).blur_global1
            torch.manual_seed(0)
            image = torch.stack([v2.functional.pil_to_tensor(blur(crop)).float() for _ in range(20)])
        return float((image[..., 1:] - image[..., :-1]).abs().mean())

    sharp, scaled, paper = detail(None), detail((0.1 * 48 / 224, 2.0 * 48 / 224)), detail((0.1, 2.0))
    assert paper < 0.5 * sharp < scaled
