"""Batched photometric augmentation: each operation against torchvision's per-image functional, the parameter draws
against DINOv2's probabilities, and the batched multi-crop path end to end (uint8 crops + parameters -> the crops a
per-image pipeline with the same draws makes)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_data_fixtures import image_files, imagenette_subset
from torchvision.transforms.v2 import functional as TF

from pretrain.data import photometric as P
from pretrain.data.collate import stack_crops
from pretrain.data.multicrop import MultiCropAugmentation, MultiCropConfig, apply_batch_photometric

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 3, "photometric": "batched"}


@pytest.fixture
def images() -> torch.Tensor:
    x = torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    x[0] = 0.5  # grey: hue undefined, saturation 0
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red: hue 0 at full saturation
    return x


@pytest.mark.parametrize(("ours", "reference", "factors"), [
    (P.adjust_brightness, TF.adjust_brightness, [0.6, 0.9, 1.0, 1.2, 1.4, 0.7]),
    (P.adjust_contrast, TF.adjust_contrast, [0.6, 0.9, 1.0, 1.2, 1.4, 0.7]),
    (P.adjust_saturation, TF.adjust_saturation, [0.8, 0.9, 1.0, 1.1, 1.2, 0.85]),
    (P.adjust_hue, TF.adjust_hue, [-0.1, -0.05, 0.0, 0.03, 0.1, 0.5]),
])
def test_each_colour_adjustment_matches_torchvision_per_image(ours, reference, factors, images) -> None:
    got = ours(images.clone(), torch.tensor(factors))
    want = torch.stack([reference(image, f) for image, f in zip(images, factors, strict=True)])
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_grayscale_and_per_crop_blur_match_torchvision(images) -> None:
    torch.testing.assert_close(P.grayscale(images), TF.rgb_to_grayscale(images), atol=1e-6, rtol=0)
    sigma = torch.tensor([0.0, 0.3, 1.0, 2.0, 0.0, 0.7])
    got = P.gaussian_blur(images, sigma, kernel_size=9)
    want = torch.stack([TF.gaussian_blur(image, [9, 9], [float(s)] * 2) if s > 0 else image
                        for image, s in zip(images, sigma, strict=True)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(got[0], images[0]) and torch.equal(got[4], images[4])  # sigma 0: untouched


def reference_pipeline(crop: torch.Tensor, row: torch.Tensor, cfg: MultiCropConfig, kernel_size: int) -> torch.Tensor:
    """One crop through torchvision's functionals in the order and with the values of its parameter row."""
    x = crop.float() / 255
    if row[P.JITTER]:
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        columns = (P.BRIGHTNESS, P.CONTRAST, P.SATURATION, P.HUE)
        for op in row[P.ORDER].long().tolist():
            x = adjust[op](x, float(row[columns[op]]))
    if row[P.GRAYSCALE]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if row[P.BLUR_SIGMA] > 0:
        x = TF.gaussian_blur(x, [kernel_size] * 2, [float(row[P.BLUR_SIGMA])] * 2)
    if row[P.SOLARIZE]:
        x = torch.where(x >= 128 / 255, 1 - x, x)
    return TF.normalize(x, list(cfg.mean), list(cfg.std))


def test_batched_multicrop_equals_the_per_crop_reference_with_the_same_draws() -> None:
    cfg = MultiCropConfig(**SMALL)
    aug = MultiCropAugmentation(cfg)
    samples = []
    for seed, path in enumerate(image_files(imagenette_subset())[:8]):
        torch.manual_seed(seed)
        with Image.open(path) as image:
            samples.append(aug(image.convert("RGB")))
    batch = stack_crops(samples, torch.float32)
    assert batch["global_crops"].dtype == torch.uint8 and batch["global_crops"].shape == (16, 3, 32, 32)
    assert batch["global_photometric"].shape == (16, P.N_PARAMS)
    assert batch["local_photometric"].shape == (24, P.N_PARAMS)
    out = apply_batch_photometric(batch, cfg)
    assert "global_photometric" not in out and "local_photometric" not in out
    kernel = P.blur_kernel_size(cfg.blur_sigma[1])
    for crops, rows in (("global_crops", batch["global_photometric"]), ("local_crops", batch["local_photometric"])):
        assert out[crops].dtype == torch.float32
        want = torch.stack([reference_pipeline(c, r, cfg, kernel) for c, r in zip(batch[crops], rows, strict=True)])
        torch.testing.assert_close(out[crops], want, atol=1e-5, rtol=0)
    assert apply_batch_photometric(out, cfg) is out  # finished crops pass through


def test_batched_multicrop_without_local_crops() -> None:
    """Global crops only (e.g. a high-resolution phase): the empty local stack goes through collate and the device."""
    cfg = MultiCropConfig(**{**SMALL, "local_crops_number": 0})
    aug = MultiCropAugmentation(cfg)
    with Image.open(image_files(imagenette_subset())[0]) as image:
        samples = [aug(image.convert("RGB")) for _ in range(3)]
    out = apply_batch_photometric(stack_crops(samples, torch.float32), cfg)
    assert out["global_crops"].shape == (6, 3, 32, 32) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape[0] == 0 and out["local_crops"].dtype == torch.float32


@pytest.mark.parametrize(("jitter_p", "hue_max", "grayscale_p"), [(0.8, 0.1, 0.2), (0.5, 0.05, 0.05)])
def test_parameter_draws_follow_the_configured_probabilities(jitter_p, hue_max, grayscale_p) -> None:
    """Rates over 4,000 draws per crop kind within 4 standard errors of DINOv2's (blur 1 / 0.1 / 0.5 by kind) or of
    a configured colour strength."""
    torch.manual_seed(0)
    n = 4000
    kinds = {"global1": (1.0, False), "global2": (0.1, True), "local": (0.5, False)}
    for kind, (blur_p, solarize) in kinds.items():
        rows = torch.stack([P.draw_photometric(blur_p, (0.1, 2.0), solarize, jitter_p=jitter_p, hue_max=hue_max,
                                               grayscale_p=grayscale_p) for _ in range(n)])
        for column, p in ((P.JITTER, jitter_p), (P.GRAYSCALE, grayscale_p),
                          (P.SOLARIZE, P.SOLARIZE_P if solarize else 0.0)):
            rate = float(rows[:, column].mean())
            assert abs(rate - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1e-9, (kind, column, rate, p)
        blurred = rows[:, P.BLUR_SIGMA] > 0
        assert abs(float(blurred.float().mean()) - blur_p) <= 4 * (blur_p * (1 - blur_p) / n) ** 0.5 + 1e-9, kind
        assert bool((rows[blurred, P.BLUR_SIGMA] >= 0.1).all() & (rows[blurred, P.BLUR_SIGMA] <= 2.0).all())
        assert sorted(rows[0, P.ORDER].long().tolist()) == [0, 1, 2, 3]
        assert len({tuple(r.long().tolist()) for r in rows[:, P.ORDER]}) == 24  # every order occurs
        for column, (low, high) in ((P.BRIGHTNESS, P.BRIGHTNESS_RANGE), (P.HUE, (-hue_max, hue_max))):
            assert low <= float(rows[:, column].min()) and float(rows[:, column].max()) <= high
            assert float(rows[:, column].max()) > high - (high - low) / 20  # the whole range is used


def test_batched_workers_leave_every_photometric_op_to_the_trainer() -> None:
    """The point of the batched path: the worker crops, flips and draws, nothing more (the CPU it saves is measured
    by bench/bench_augment.py, a ratio in one run; a test timing it would race the machine)."""
    with Image.open(image_files(imagenette_subset())[0]) as image:
        photo = image.convert("RGB")
    sizes = {"global_crops_size": 112, "local_crops_size": 48, "local_crops_number": 3}
    aug = MultiCropAugmentation(MultiCropConfig(**sizes, photometric="batched"))

    def refuse(_crop):
        raise AssertionError("a photometric op ran in the worker")

    aug.global1 = aug.global2 = aug.local = refuse
    out = aug(photo)
    assert [c.dtype for c in out["global_crops"] + out["local_crops"]] == [torch.uint8] * 5
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 112, 112)] * 2
    assert out["global_photometric"].shape[0] == 2 and out["local_photometric"].shape[0] == 3


def test_unknown_photometric_mode_and_bad_colour_values_are_refused() -> None:
    with pytest.raises(ValueError, match="photometric must be one of"):
        MultiCropConfig(photometric="gpu")
    with pytest.raises(ValueError, match="color_jitter_p is a probability"):
        MultiCropConfig(color_jitter_p=1.5)
    with pytest.raises(ValueError, match="color_jitter_hue must be in"):
        MultiCropConfig(color_jitter_hue=0.7)


def test_per_image_path_uses_the_configured_colour_strength() -> None:
    aug = MultiCropAugmentation(MultiCropConfig(color_jitter_p=0.5, color_jitter_hue=0.05, grayscale_p=0.05))
    jitter, grayscale = aug.global1.transforms[:2]
    assert jitter.p == 0.5 and jitter.transforms[0].hue == (-0.05, 0.05)
    assert grayscale.p == 0.05
