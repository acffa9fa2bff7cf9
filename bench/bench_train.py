"""Training-step speed: images/s and MFU of our SSL step against (a) the same step without sequence packing and
efficient stochastic depth and (b) a plain timm ViT forward+backward on the same crops.

MFU is model FLOPs per second over the peak: on CPU the fastest fp32 2048x2048 matmul, timed in the same
interleaved rounds as the steps; on a known GPU its data-sheet figure. Prints one JSON object. Example:
    python bench/bench_train.py --models cpu_tiny vits14 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

from pretrain.config import load_config
from pretrain.data.masking import MaskingGenerator
from pretrain.losses import masks_weight_from_masks
from pretrain.meta_arch import SSLMetaArch, build_backbone
from pretrain.models import count_forward_flops
from pretrain.optim import build_optimizer
from pretrain.throughput import peak_flops
from pretrain.train import TrainConfig, flops_per_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def synthetic_batch(cfg: TrainConfig, images: int, device: torch.device) -> dict:
    """A collated multi-crop batch of the recipe's crop sizes with DINOv2's masking."""
    crops, p = cfg.data.multicrop, cfg.model.patch_size
    grid = crops.global_crops_size // p
    gen = MaskingGenerator((grid, grid), max_num_patches=int(0.5 * grid * grid))
    masks = torch.zeros(2 * images, grid * grid, dtype=torch.bool)
    for i in range(images):  # half of the global crops masked, as the collate does
        masks[i] = torch.from_numpy(gen(int(0.3 * grid * grid))).flatten()
    return {
        "global_crops": torch.randn(2 * images, 3, crops.global_crops_size, crops.global_crops_size, device=device),
        "local_crops": torch.randn(crops.local_crops_number * images, 3, crops.local_crops_size,
                                   crops.local_crops_size, device=device),
        "masks": masks.to(device),
        "mask_indices": masks.flatten().nonzero().flatten().to(device),
        "masks_weight": masks_weight_from_masks(masks).to(device),
        "n_masked_patches": int(masks.sum()),
    }


def interleaved_min_seconds(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Per-variant fastest step over `rounds` rounds that run every variant once, after one warm-up each: on a
    shared machine, interleaving spreads load spikes over all variants and the minimum is the least disturbed."""
    for step in steps.values():
        step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def ssl_step(cfg: TrainConfig, batch: dict, device: torch.device) -> tuple[Callable[[], None], float]:
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg.model, cfg.loss).to(device).train()
    optimizer = build_optimizer(meta.student, cfg.optim, depth=len(meta.student["backbone"].blocks))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = meta.compute_losses(batch, 0.07)
        loss.backward()
        optimizer.step()

    return step, flops_per_step(meta, batch)


def timm_step(cfg: TrainConfig, batch: dict, device: torch.device) -> tuple[Callable[[], None], float]:
    """timm's DINOv2 ViT with the same width/depth: forward + backward of every crop batch (no teacher, no heads)."""
    m = cfg.model
    name = {"vit_small": "vit_small_patch14_dinov2", "vit_tiny": "vit_small_patch14_dinov2"}[m.arch]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=cfg.data.multicrop.global_crops_size,
                              patch_size=m.patch_size, dynamic_img_size=True, drop_path_rate=m.drop_path_rate,
                              num_classes=0, **({"embed_dim": 192, "num_heads": 3} if m.arch == "vit_tiny" else {}),
                              **({"depth": m.depth} if m.depth else {})).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    crops = [batch["global_crops"], batch["local_crops"]]

    def step():
        optimizer.zero_grad(set_to_none=True)
        sum(model(c).float().square().mean() for c in crops).backward()
        optimizer.step()

    with torch.device("meta"):  # the same architecture as ours: count its FLOPs on our model
        same = build_backbone(cfg.model, drop_path=False)
    return step, 3 * sum(count_forward_flops(same, [tuple(c.shape)]) for c in crops)


def matmul_step(device: torch.device, size: int = 2048) -> tuple[Callable[[], None], float]:
    """One fp32 square matmul: its fastest time in the same rounds gives the peak that MFU divides by."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))

    def step():
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step, 2 * size**3


def bench_model(name: str, images: int, rounds: int, device: torch.device) -> dict:
    overrides = ["data.dataset=unused", "precision=fp32"]
    if name != "cpu_tiny":  # efficient stochastic depth engages above a drop rate of 0.1 (the reference's rule)
        overrides.append("model.drop_path_rate=0.3")
    cfg = load_config(TrainConfig, CONFIGS / f"{name}.yaml", overrides)
    batch = synthetic_batch(cfg, images, device)
    ours, flops = ssl_step(cfg, batch, device)
    cfg.model.sequence_packing, cfg.model.efficient_drop_path = False, False
    plain, _ = ssl_step(cfg, batch, device)
    baseline, timm_flops = timm_step(cfg, batch, device)
    matmul, matmul_flops = matmul_step(device)
    seconds = interleaved_min_seconds({"matmul": matmul, "ours": ours, "plain": plain, "timm": baseline}, rounds)
    peak = peak_flops(device) if device.type == "cuda" else matmul_flops / seconds["matmul"]

    def entry(key: str, model_flops: float) -> dict:
        return {"step_s": seconds[key], "images_per_s": images / seconds[key],
                "mfu": model_flops / seconds[key] / peak}

    return {
        "images_per_step": images,
        "peak_gflops": peak / 1e9,
        "model_gflops_per_step": flops / 1e9,
        "ours": entry("ours", flops),
        "no_packing_no_efficient_drop_path": entry("plain", flops),
        "timm_forward_backward": entry("timm", timm_flops),
        "speedup_vs_unpacked": seconds["plain"] / seconds["ours"],
        "mfu_ratio_vs_timm": (flops / seconds["ours"]) / (timm_flops / seconds["timm"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cpu_tiny", "vits14"])
    parser.add_argument("--images", type=int, default=0, help="images per step (0: 64 for cpu_tiny, 4 otherwise)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {name: bench_model(name, args.images or (64 if name == "cpu_tiny" else 4), args.rounds, device)
               for name in args.models}
    print(json.dumps({"bench": "train_step", "device": str(device), "cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
