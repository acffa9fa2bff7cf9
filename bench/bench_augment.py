"""What multi-crop costs a data worker, per recipe: CPU milliseconds an image for `photometric: per_image` (colour,
blur and solarize in PIL in the worker) against `batched` (the worker crops, flips and draws parameters; the trainer
finishes the batch on its device), and the trainer's share of `batched` when that device is this CPU. One JSON
object; ratios are per_image / batched from the same images in the same run.

usage: python bench/bench_augment.py [--recipes cpu_tiny,gpu_small,...] [--images N] [--data DIR] [--compare-with DIR]
Workers run one torch thread each (the loader's setting), so the figures are per core: a machine with W workers
finishes at most W * 1000 / ms images a second.

The JSON names the PIL build it ran with (`decoder`: pillow or pillow-simd) and its decode time. pillow-simd against
pillow: one process imports one PIL, so the comparison runs this script a second time, in a child process whose path
starts with a site directory holding the other build (`--compare-with DIR`; by default, when this process has
pillow-simd, the pillow that `make simd` replaced, kept in PREFIX/pillow-plain/site), on the same images, and the
headline is then worker ms with pillow / with pillow-simd. Without both builds measured in this run no such ratio is
printed: the headline is the per_image / batched worker ratio and `decoder_comparison` says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from bench.bench_cpu_recipe import DEFAULT_DATA  # noqa: E402
from bench.headline import geometric_mean, headline  # noqa: E402
from bench.timing import Clock  # noqa: E402
from dinoforge.config import load_config  # noqa: E402
from dinoforge.data.decode import decode_image, decoder_name  # noqa: E402
from pretrain.data.collate import stack_crops  # noqa: E402
from pretrain.data.multicrop import MultiCropAugmentation, MultiCropConfig, apply_batch_photometric  # noqa: E402
from pretrain.train_config import TrainConfig  # noqa: E402

CONFIGS = REPO / "configs" / "pretrain"
TRAINER_BATCH = 32


def image_bytes(root: Path, n: int) -> list[bytes]:
    """The encoded bytes of `n` photos spread over root's class folders."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        sys.exit(f"error: no images under {root}: pass --data with a train/ folder of photos")
    return [path.read_bytes() for path in files[::max(1, len(files) // n)][:n]]


def load_images(root: Path, n: int) -> list[Image.Image]:
    """`n` decoded RGB photos spread over root's class folders (decoding is not timed)."""
    return [decode_image(data) for data in image_bytes(root, n)]


def decode_ms(encoded: list[bytes]) -> float:
    """CPU ms an image of the one decoder (`decode_image`), best of three passes over the bytes in memory."""
    best = float("inf")
    for _ in range(3):
        clock = Clock()
        for data in encoded:
            decode_image(data)
        best = min(best, clock.read()[1])
    return 1000 * best / len(encoded)


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


def shipped_worker_ms(results: dict) -> dict[str, float]:
    """recipe -> worker ms an image of the photometric mode the recipe ships with."""
    return {name: r["worker_ms_per_image"][r["shipped"]] for name, r in results.items()}


def default_comparison() -> Path | None:
    """The pillow `make simd` replaced, when this process decodes with pillow-simd and that copy exists."""
    site = Path(sys.prefix) / "pillow-plain" / "site"
    return site if decoder_name().startswith("pillow-simd") and (site / "PIL").is_dir() else None


def measure_with(site: Path, argv: list[str]) -> dict:
    """This bench's JSON from a child process that imports PIL from `site` first (`--compare-with none` there)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, *argv, "--compare-with", "none"], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the run with {site} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


def compare_decoders(ours: dict, other: dict) -> dict:
    """pillow's and pillow-simd's worker ms of the shipped mode per recipe, and their ratios (pillow / simd)."""
    runs = {ours["decoder"]: ours, other["decoder"]: other}
    simd = [name for name in runs if name.startswith("pillow-simd")]
    plain = [name for name in runs if not name.startswith("pillow-simd")]
    if len(simd) != 1 or len(plain) != 1:
        return {"measured": False, "why": f"both runs decoded with the same kind of PIL: {', '.join(runs)}"}
    simd_ms, plain_ms = shipped_worker_ms(runs[simd[0]]["recipes"]), shipped_worker_ms(runs[plain[0]]["recipes"])
    return {"measured": True, "pillow": plain[0], "pillow_simd": simd[0],
            "decode_ms_per_image": {name: run["decode_ms_per_image"] for name, run in runs.items()},
            "shipped_worker_ms_per_image": {plain[0]: plain_ms, simd[0]: simd_ms},
            "worker_speedup": {name: round(plain_ms[name] / simd_ms[name], 3) for name in simd_ms},
            "decode_speedup": round(runs[plain[0]]["decode_ms_per_image"] / runs[simd[0]]["decode_ms_per_image"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="cpu_tiny,gpu_small,vits14,vitb14,vitl14,vitg14,highres")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/ photos")
    parser.add_argument("--compare-with", default="auto", metavar="DIR",
                        help="a site dir with the other PIL build (auto: make simd's kept pillow; none: no comparison)")
    args = parser.parse_args()
    encoded = image_bytes(args.data / "train", args.images)
    images = [decode_image(data) for data in encoded]
    trainer_threads = torch.get_num_threads()  # torch's default here, as the training process gets it
    results = {name: measure(name, images, trainer_threads) for name in args.recipes.split(",")}
    sizes = sorted({image.size for image in images})
    out = {"images": len(images), "image_sizes": [list(s) for s in sizes[:3]], "decoder": decoder_name(),
           "decode_ms_per_image": round(decode_ms(encoded), 3), "recipes": results}
    site = default_comparison() if args.compare_with == "auto" else \
        None if args.compare_with == "none" else Path(args.compare_with)
    if site is None:
        out["decoder_comparison"] = {"measured": False, "why": f"only {out['decoder']} here (make simd installs "
                                     "pillow-simd and keeps pillow for this comparison)"}
    else:
        argv = ["--recipes", args.recipes, "--images", str(args.images), "--data", str(args.data)]
        out["decoder_comparison"] = compare_decoders(out, measure_with(site, argv))
    comparison = out["decoder_comparison"]
    if comparison["measured"]:
        speedups = comparison["worker_speedup"]
        out["headline"] = headline(f"multi-crop worker CPU ms an image, {comparison['pillow']} / "
                                   f"{comparison['pillow_simd']} (shipped photometric, geometric mean over "
                                   f"{len(speedups)} recipes)", geometric_mean(speedups.values()),
                                   f"{comparison['pillow']} on the same images and draws (one process each, this run)")
    else:
        out["headline"] = headline(f"multi-crop worker CPU ms an image, per_image / batched photometric (geometric "
                                   f"mean over {len(results)} recipes; {out['decoder']})",
                                   geometric_mean(r["worker_ratio"] for r in results.values()),
                                   "per_image photometric (colour, blur, solarize in PIL in the worker)")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
