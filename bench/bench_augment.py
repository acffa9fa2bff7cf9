"""What multi-crop costs a data worker, per recipe: CPU milliseconds an image for `photometric: per_image` (colour,
blur and solarize in PIL in the worker) against `batched` (the worker crops, flips and draws parameters; the trainer
finishes the batch on its device), and the trainer's share of `batched` when that device is this CPU. One JSON
object; ratios are per_image / batched from the same images in the same run.

usage: python bench/bench_augment.py [--recipes cpu_tiny,gpu_small,...] [--images N] [--data DIR]
Workers run one torch thread each (the loader's setting), so the figures are per core: a machine with W workers
finishes at most W * 1000 / ms images a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from bench.bench_cpu_recipe import DEFAULT_DATA  # noqa: E402
from bench.timing import Clock  # noqa: E402
from dinoforge.config import load_config  # noqa: E402
from pretrain.data.collate import stack_crops  # noqa: E402
from pretrain.data.multicrop import MultiCropAugmentation, MultiCropConfig, apply_batch_photometric  # noqa: E402
from pretrain.train_config import TrainConfig  # noqa: E402

CONFIGS = REPO / "configs" / "pretrain"
TRAINER_BATCH = 32


def load_images(root: Path, n: int) -> list[Image.Image]:
    """`n` decoded RGB photos spread over root's class folders (decoding is not timed)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        sys.exit(f"error: no images under {root}: pass --data with a train/ folder of photos")
    step = max(1, len(files) // n)
    images = []
    for path in files[::step][:n]:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def worker_ms(cfg: MultiCropConfig, images: list[Image.Image]) -> tuple[float, list[dict]]:
    """CPU ms an image of one multi-crop call, and the samples (seeded, so both modes see the same draws)."""
    augmentation = MultiCropAugmentation(cfg)
    torch.manual_seed(0)
    clock = Clock()
    samples = [augmentation(image) for image in images]
    return 1000 * clock.read()[1] / len(images), samples


def trainer_ms(cfg: MultiCropConfig, samples: list[dict]) -> float:
    """CPU ms an image of `apply_batch_photometric` on batches of TRAINER_BATCH (best of three)."""
    batch = stack_crops(samples[:TRAINER_BATCH], torch.float32)
    apply_batch_photometric(batch, cfg)  # warm-up
    best = float("inf")
    for _ in range(3):
        clock = Clock()
        apply_batch_photometric(batch, cfg)
        best = min(best, clock.read()[1])
    return 1000 * best / TRAINER_BATCH


def measure(name: str, images: list[Image.Image], trainer_threads: int) -> dict:
    """Both paths of recipe `name` on `images`: the worker with one thread, the trainer with `trainer_threads`."""
    crops = load_config(TrainConfig, CONFIGS / f"{name}.yaml", ["data.dataset=unused"]).data.multicrop
    torch.set_num_threads(1)  # as in a data worker
    per_image, _ = worker_ms(dataclasses.replace(crops, photometric="per_image"), images)
    batched_cfg = dataclasses.replace(crops, photometric="batched")
    batched, samples = worker_ms(batched_cfg, images)
    torch.set_num_threads(trainer_threads)
    trainer = trainer_ms(batched_cfg, samples)
    return {"crops": f"2 x {crops.global_crops_size} + {crops.local_crops_number} x {crops.local_crops_size} px",
            "shipped": crops.photometric, "worker_ms_per_image": {"per_image": round(per_image, 2),
                                                                  "batched": round(batched, 2)},
            "worker_ratio": round(per_image / batched, 2), "trainer_cpu_ms_per_image_batched": round(trainer, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="cpu_tiny,gpu_small,vits14,vitb14,vitl14,vitg14,highres")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/ photos")
    args = parser.parse_args()
    images = load_images(args.data / "train", args.images)
    trainer_threads = torch.get_num_threads()  # torch's default here, as the training process gets it
    results = {name: measure(name, images, trainer_threads) for name in args.recipes.split(",")}
    sizes = sorted({image.size for image in images})
    print(json.dumps({"images": len(images), "image_sizes": [list(s) for s in sizes[:3]], "recipes": results},
                     indent=1))


if __name__ == "__main__":
    main()
