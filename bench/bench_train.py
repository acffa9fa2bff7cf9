"""Training-step speed: images/s, TFLOP/s and MFU of our SSL step against (a) the same step without sequence packing
and efficient stochastic depth, (b) the same step sharded with FSDP2 (a process group of one) and (c) a plain timm
DINOv2 ViT forward+backward on the same crops.

Configs: by default fp32 with drop path 0.3 (so that efficient stochastic depth engages), 64 images per step for
cpu_tiny and 4 otherwise, the comparison for the CPU development machine; with `--recipe` the recipe's batch size,
precision, drop path and activation checkpointing, as `python -m pretrain train` runs it on one GPU (bf16: autocast;
FSDP2: bf16 parameters, fp32 reduction). Timing (`--timing auto`): on CPU every variant is alive at once and timed in
interleaved rounds (load spikes of a shared machine spread over all variants), MFU against the fastest matmul of the
same rounds; on CUDA the variants are built and timed one after the other (two ViT-g copies do not fit beside each
other), each freed before the next, MFU against the data-sheet peak of the GPU and against a measured 8192x8192
matmul of the compute dtype. A step is zero_grad, forward, backward, gradient clipping, optimizer step and teacher
EMA (the trainer's step); model FLOPs exclude recomputation by activation checkpointing (the MFU convention). Prints
one JSON object. With `--profile DIR` each variant's step is also profiled after its timing (bench/step_profile.py:
named phases, top kernels, host-device syncs, device idle gaps; our step then includes the batched photometric ops
on uint8 crops of the recipe's sizes, as the trainer runs them): DIR gets a gzipped chrome trace per model and
variant, profile.json and profile.md, and the JSON a `profile` entry per variant. Examples:
    python bench/bench_train.py --models cpu_tiny vits14 --rounds 3
    python bench/bench_train.py --device cuda --recipe --models vits14 vitl14 vitg14 --variants ours fsdp timm
    python bench/bench_train.py --device cuda --recipe --models vits14 --variants ours timm --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from timm.layers import Mlp, SwiGLUPacked
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dinoforge.config import load_config
from dinoforge.launch import DistributedEnv
from dinoforge.models.config import build_backbone
from dinoforge.models.ffn import swiglu_hidden_features
from dinoforge.precision import autocast
from pretrain.data.masking import MaskingGenerator
from pretrain.data.multicrop import apply_batch_photometric
from pretrain.data.photometric import draw_photometric
from pretrain.distributed import apply_activation_checkpointing, apply_compile, apply_fsdp, ema_update
from pretrain.losses import masks_weight_from_masks
from pretrain.meta_arch import SSLMetaArch
from pretrain.optim import build_optimizer, clip_grad_norm
from pretrain.ssl_learner import flops_per_step
from pretrain.throughput import datasheet_peak, measure_matmul_peak
from pretrain.train_config import TrainConfig

try:  # run as a script, bench/ is on sys.path; imported by the tests, bench is a namespace package
    from headline import geometric_mean, headline
    from step_profile import PhaseTimer, markdown, profile_step
except ImportError:
    from bench.headline import geometric_mean, headline
    from bench.step_profile import PhaseTimer, markdown, profile_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
VARIANTS = {  # name on the command line -> key in the JSON
    "ours": "ours",
    "plain": "no_packing_no_efficient_drop_path",
    "fsdp": "ours_fsdp2",
    "fsdp_keep": "ours_fsdp2_no_reshard",  # FSDP2 keeping gathered parameters from forward to backward
    "compiled": "ours_compiled",  # torch.compile of every block, as `compile=true` in the trainer
    "timm": "timm_forward_backward",
}
TIMM_NAMES = {"vit_tiny": "vit_small_patch14_dinov2", "vit_small": "vit_small_patch14_dinov2",
              "vit_base": "vit_base_patch14_dinov2", "vit_large": "vit_large_patch14_dinov2",
              "vit_giant2": "vit_giant_patch14_dinov2"}
Step = Callable[[], None]


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


def bench_config(name: str, recipe: bool, precision: str | None, overrides: list[str]) -> TrainConfig:
    """The recipe `name` as benchmarked: unchanged with `recipe`, else fp32 with drop path 0.3 and no checkpointing."""
    values = ["data.dataset=unused"]
    if not recipe:
        values += ["precision=fp32", "activation_checkpointing=false"]
        if name != "cpu_tiny":  # efficient stochastic depth engages above a drop rate of 0.1 (the reference's rule)
            values.append("model.drop_path_rate=0.3")
    if precision:
        values.append(f"precision={precision}")
    return load_config(TrainConfig, CONFIGS / f"{name}.yaml", values + list(overrides))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_min_seconds(steps: dict[str, Step], rounds: int, warmup: bool = True) -> dict[str, float]:
    """Per-variant fastest step over `rounds` rounds that run every variant once, after one warm-up each: on a
    shared machine, interleaving spreads load spikes over all variants and the minimum is the least disturbed."""
    for step in steps.values() if warmup else ():
        step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def min_seconds(step: Step, rounds: int, device: torch.device, warmup: int = 2) -> float:
    """Fastest of `rounds` synchronised steps after `warmup` (kernel selection, allocator growth)."""
    for _ in range(warmup):
        step()
    _sync(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_group(device: torch.device) -> DistributedEnv:
    """A process group of one (NCCL on CUDA, gloo on CPU), so that FSDP2 really shards and gathers."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                device_id=device if backend == "nccl" else None)
    return DistributedEnv(0, 1, 0, device, backend)


def build_meta(cfg: TrainConfig, device: torch.device, env: DistributedEnv | None = None,
               reshard_after_forward: bool = True) -> SSLMetaArch:
    """Student and teacher as the trainer builds them: checkpointing, compile (`cfg.compile`), then FSDP2 when `env`
    is given. Built on `device` directly: initialising ViT-g on the CPU takes longer than the whole benchmark."""
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        meta = SSLMetaArch(cfg.model, cfg.loss)
    meta.train()
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(meta.student["backbone"].blocks)
    for side in (meta.student, meta.teacher):
        if cfg.compile:
            apply_compile(side["backbone"].blocks)
        if env is not None:
            apply_fsdp(side, side["backbone"].blocks, env, param_dtype=cfg.precision,
                       reshard_after_forward=reshard_after_forward, force=True)
    return meta


def time_phases(meta: SSLMetaArch, timer: PhaseTimer) -> None:
    """Name the parts of the forward pass that the profile reports: backbones, heads, teacher targets, losses."""
    for side_name, side in (("teacher", meta.teacher), ("student", meta.student)):
        for name, module in side.items():
            timer.wrap(module, "forward", f"{side_name}_{name}")
    for loss_name, loss in (("dino", meta.dino_loss), ("ibot", meta.ibot_patch_loss)):
        timer.wrap(loss, "sinkhorn_knopp_teacher", f"{loss_name}_sinkhorn_knopp")
        timer.wrap(loss, "softmax_center_teacher", f"{loss_name}_centering")
    timer.wrap(meta.dino_loss, "forward", "dino_loss")
    timer.wrap(meta.ibot_patch_loss, "forward_masked", "ibot_loss")
    timer.wrap(meta.koleo_loss, "forward", "koleo_loss")


def ssl_step(cfg: TrainConfig, batch: dict, device: torch.device, env: DistributedEnv | None = None,
             timer: PhaseTimer | None = None, reshard_after_forward: bool = True) -> tuple[Step, float]:
    """Our training step; unsharded under bf16 autocast when `cfg.precision` is bf16, or sharded over `env`
    (FSDP2's MixedPrecisionPolicy then sets the compute dtype). `timer` names its phases for a profile."""
    meta = build_meta(cfg, device, env, reshard_after_forward)
    optimizer = build_optimizer(meta.student, cfg.optim, depth=len(meta.student["backbone"].blocks))
    phase = timer or PhaseTimer(device)
    if timer is not None:
        time_phases(meta, timer)

    def step():
        with phase("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        with phase("forward"), contextlib.nullcontext() if env is not None else autocast(device, cfg.precision):
            loss, _ = meta.compute_losses(batch, 0.07)
        with phase("backward"):
            loss.backward()
        with phase("clip_grad"):
            clip_grad_norm(meta.student, cfg.optim.clip_grad, cfg.optim.clip_per_module)
        with phase("optimizer"):
            optimizer.step()
        with phase("ema"):
            ema_update(meta.teacher, meta.student, 0.994)

    return step, flops_per_step(meta, batch)


def photometric_step(cfg: TrainConfig, images: int, device: torch.device, timer: PhaseTimer) -> Step:
    """The trainer's batched photometric ops on uint8 crops of the recipe's sizes, their parameters drawn as the
    data workers draw them (left on the device, as the trainer's batch has them)."""
    crops = cfg.data.multicrop
    generator = torch.Generator().manual_seed(0)
    draw = functools.partial(draw_photometric, sigma=tuple(crops.blur_sigma), jitter_p=crops.color_jitter_p,
                             hue_max=crops.color_jitter_hue, grayscale_p=crops.grayscale_p)
    batch = {}
    for name, count, size in (("global", 2 * images, crops.global_crops_size),
                              ("local", crops.local_crops_number * images, crops.local_crops_size)):
        batch[f"{name}_crops"] = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                                               generator=generator).to(device)
        batch[f"{name}_photometric"] = torch.stack([draw(0.5, solarize=i % 2 == 1) for i in range(count)]).to(device)

    def step():
        with timer("photometric"):
            apply_batch_photometric(batch, crops)

    return step


def timm_model(cfg: TrainConfig, drop_path: bool = True) -> nn.Module:
    """timm's DINOv2 ViT with the width, depth, heads, FFN and patch size of the recipe's backbone."""
    m = cfg.model
    with torch.device("meta"):
        ours = build_backbone(m, drop_path=False)
    width = ours.embed_dim
    kwargs: dict = {"img_size": cfg.data.multicrop.global_crops_size, "patch_size": m.patch_size,
                    "embed_dim": width, "depth": len(ours.blocks), "num_heads": ours.blocks[0].attn.num_heads,
                    "dynamic_img_size": True, "drop_path_rate": m.drop_path_rate if drop_path else 0.0,
                    "num_classes": 0, "init_values": m.layerscale}
    if m.ffn_layer.startswith("swiglu"):  # timm packs SwiGLU's two input projections into one: twice our width
        hidden = 2 * swiglu_hidden_features(4 * width)
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=(hidden + 0.5) / width)
    else:
        kwargs.update(mlp_layer=Mlp, act_layer=nn.GELU, mlp_ratio=4.0)
    if m.num_register_tokens:
        kwargs.update(reg_tokens=m.num_register_tokens, no_embed_class=True)
    return timm.create_model(TIMM_NAMES[m.arch], pretrained=False, **kwargs)


def _flop_counter() -> FlopCounterMode:
    """The model layer's counter (it knows every fused attention kernel) when it has one, else torch's."""
    from dinoforge.models import flops

    make = getattr(flops, "flop_counter", None)
    return make() if make is not None else FlopCounterMode(display=False)


def timm_step_flops(cfg: TrainConfig, crops: list[tuple[int, ...]]) -> float:
    """Forward + backward (3x forward) FLOPs of the timm model itself, counted on the meta device."""
    with torch.device("meta"):
        model = timm_model(cfg, drop_path=False).eval()
    with torch.no_grad(), _flop_counter() as counter:
        for shape in crops:
            model(torch.empty(shape, device="meta"))
    return 3.0 * counter.get_total_flops()


def timm_step(cfg: TrainConfig, batch: dict, device: torch.device,
              timer: PhaseTimer | None = None) -> tuple[Step, float]:
    """timm's DINOv2 ViT: forward + backward of every crop batch (no teacher, no heads), same precision and
    activation checkpointing as the recipe."""
    torch.manual_seed(0)
    with torch.device(device):
        model = timm_model(cfg)
    model.train()
    model.set_grad_checkpointing(cfg.activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    crops = [batch["global_crops"], batch["local_crops"]]
    phase = timer or PhaseTimer(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with phase("forward"), autocast(device, cfg.precision):
            loss = sum(model(c).float().square().mean() for c in crops)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()

    return step, timm_step_flops(cfg, [tuple(c.shape) for c in crops])


def matmul_step(device: torch.device, dtype: torch.dtype = torch.float32,
                size: int = 2048) -> tuple[Step, float]:
    """One square matmul: its fastest time in the same rounds gives the peak that MFU divides by."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))

    def step():
        a @ b
        _sync(device)

    return step, 2 * size**3


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_variant(variant: str, cfg: TrainConfig, batch: dict, device: torch.device,
                  timer: PhaseTimer | None = None) -> tuple[Step, float]:
    """(step, model FLOPs per step) of one variant; the process group of FSDP2 is created on first use. With a
    `timer` the step's phases are named for a profile, and ours runs the photometric ops first."""
    if variant == "timm":
        return timm_step(cfg, batch, device, timer)
    if variant == "ours":
        step, flops = ssl_step(cfg, batch, device, timer=timer)
    elif variant == "plain":
        model = dataclasses.replace(cfg.model, sequence_packing=False, efficient_drop_path=False)
        step, flops = ssl_step(dataclasses.replace(cfg, model=model), batch, device, timer=timer)
    elif variant in ("fsdp", "fsdp_keep"):
        step, flops = ssl_step(cfg, batch, device, single_process_group(device), timer,
                               reshard_after_forward=variant == "fsdp")
    elif variant == "compiled":
        step, flops = ssl_step(dataclasses.replace(cfg, compile=True), batch, device, timer=timer)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    if timer is None:
        return step, flops
    photometric = photometric_step(cfg, batch["global_crops"].shape[0] // 2, device, timer)

    def with_photometric():
        photometric()
        step()

    return with_photometric, flops


def profile_variant(variant: str, name: str, cfg: TrainConfig, batch: dict, device: torch.device, out_dir: Path,
                    steps: int) -> dict:
    """A profile of one variant's step (built afresh with its phases named), with its trace in `out_dir` and its
    tables in NAME.VARIANT.profile.json there at once (a later variant that runs out of time loses only its own)."""
    timer = PhaseTimer(device)
    step, _ = build_variant(variant, cfg, batch, device, timer)
    report = profile_step(step, timer, device, out_dir / f"{name}.{variant}.trace.json.gz", steps=steps)
    (out_dir / f"{name}.{variant}.profile.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def bench_model(name: str, images: int, rounds: int, device: torch.device, variants: list[str],
                recipe: bool = False, precision: str | None = None, overrides: list[str] | None = None,
                interleaved: bool = True, profile_dir: Path | None = None, profile_steps: int = 3) -> dict:
    """One recipe's variants timed over `rounds` (0: profiled only, which needs `profile_dir`)."""
    cfg = bench_config(name, recipe, precision, overrides or [])
    images = images or (cfg.data.batch_size_per_rank if recipe else 64 if name == "cpu_tiny" else 4)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    batch = synthetic_batch(cfg, images, device)
    datasheet = datasheet_peak(device, cfg.precision)
    results: dict[str, dict] = {}
    flops: dict[str, float] = {}
    seconds: dict[str, float] = {}
    memory: dict[str, float] = {}
    matmul = None
    timed = variants if rounds > 0 else []
    if interleaved and timed:
        steps: dict[str, Step] = {}
        for variant in timed:
            try:
                steps[variant], flops[variant] = build_variant(variant, cfg, batch, device)
            except Exception as e:  # one variant that cannot run (e.g. no process group support) reports why
                results[variant] = {"error": _error_text(e)}
        for variant in list(steps):  # the warm-up step; a variant that fails in it leaves the rounds
            try:
                steps[variant]()
            except Exception as e:
                results[variant] = {"error": _error_text(e)}
                del steps[variant], flops[variant]
        steps["matmul"], matmul_flops = matmul_step(device, dtype)
        steps["matmul"]()
        seconds = interleaved_min_seconds(steps, rounds, warmup=False)
        matmul = matmul_flops / seconds.pop("matmul")
        steps.clear()
    elif timed:
        matmul = measure_matmul_peak(device, dtype, size=8192 if device.type == "cuda" else 2048)
        for variant in timed:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step = None
            try:
                step, flops[variant] = build_variant(variant, cfg, batch, device)
                seconds[variant] = min_seconds(step, rounds, device)
                if device.type == "cuda":
                    memory[variant] = torch.cuda.max_memory_allocated(device) / 2**30
            except Exception as e:  # e.g. out of memory: the other variants still run
                results[variant] = {"error": _error_text(e)}
                flops.pop(variant, None)
            step = None  # frees the variant's models and optimizer before the next one is built
            _free(device)
    profiles = {}
    for variant in (seconds if timed else variants) if profile_dir is not None else ():
        try:  # after the timing, one variant alive at a time: a profile never costs a variant its number
            profiles[variant] = profile_variant(variant, name, cfg, batch, device, profile_dir, profile_steps)
        except Exception as e:
            profiles[variant] = {"error": _error_text(e)}
        _free(device)
    peak = datasheet or matmul
    results.update({variant: {"profile": profiles[variant]} for variant in profiles if variant not in seconds})
    for variant, step_s in seconds.items():
        tflops = flops[variant] / step_s / 1e12
        results[variant] = {
            "step_s": step_s, "images_per_s": images / step_s, "tflops": tflops, "mfu": tflops * 1e12 / peak,
            "mfu_vs_datasheet": tflops * 1e12 / datasheet if datasheet else None,
            "mfu_vs_matmul": tflops * 1e12 / matmul,
            **({"peak_memory_gib": memory[variant]} if variant in memory else {}),
            **({"profile": profiles[variant]} if variant in profiles else {}),
        }
    out = {
        "images_per_step": images,
        "precision": cfg.precision,
        "activation_checkpointing": cfg.activation_checkpointing,
        "crops": {"global": list(batch["global_crops"].shape), "local": list(batch["local_crops"].shape)},
        "peak_gflops": peak / 1e9 if peak else None,
        "peak_tflops_datasheet": datasheet / 1e12 if datasheet else None,
        "peak_tflops_matmul": matmul / 1e12 if matmul else None,
        "model_gflops_per_step": flops.get("ours", flops.get("fsdp", flops.get("plain", 0.0))) / 1e9,
        **({"timm_gflops_per_step": flops["timm"] / 1e9} if "timm" in flops else {}),
        **{VARIANTS[v]: results[v] for v in variants if v in results},
    }
    ok = set(seconds)
    if {"ours", "plain"} <= ok:
        out["speedup_vs_unpacked"] = seconds["plain"] / seconds["ours"]
    if {"ours", "timm"} <= ok:
        out["mfu_ratio_vs_timm"] = (flops["ours"] / seconds["ours"]) / (flops["timm"] / seconds["timm"])
    if {"ours", "fsdp"} <= ok:
        out["fsdp2_speed_vs_autocast"] = seconds["ours"] / seconds["fsdp"]
    if {"ours", "fsdp_keep"} <= ok:
        out["fsdp2_no_reshard_speed_vs_autocast"] = seconds["ours"] / seconds["fsdp_keep"]
    if {"ours", "compiled"} <= ok:
        out["compiled_speedup"] = seconds["ours"] / seconds["compiled"]
    return out


def train_headline(results: dict) -> dict:
    """Our step's MFU over the timm ViT's, the geometric mean over the models where both were timed; without a timm
    figure, our speed-up over the unpacked step."""
    for key, what, baseline in (("mfu_ratio_vs_timm", "MFU of our SSL step / timm DINOv2 ViT forward+backward",
                                 "a plain timm ViT step on the same crops"),
                                ("speedup_vs_unpacked", "speed of our SSL step / the same step unpacked",
                                 "our step without sequence packing and efficient stochastic depth")):
        found = {name: r[key] for name, r in results.items() if key in r}
        if found:
            return headline(f"{what}, geometric mean over {', '.join(found)}", geometric_mean(found.values()),
                            baseline)
    return headline("MFU of our SSL step / timm ViT: not measured (no variant pair timed)", None,
                    "a plain timm ViT step on the same crops")


def write_profiles(results: dict, out_dir: Path) -> None:
    """profile.json (every model's and variant's profile) and profile.md (their tables) in `out_dir`."""
    found = {f"{model} {VARIANTS[v]}": entry["profile"] for model, section in results.items()
             for v in VARIANTS if isinstance(entry := section.get(VARIANTS[v]), dict) and "profile" in entry}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps(found, indent=2) + "\n")
    text = "\n".join(markdown(title, report) if "error" not in report else f"### {title}\n\n{report['error']}\n"
                     for title, report in found.items())
    (out_dir / "profile.md").write_text(text)


def resolve_device(name: str) -> torch.device:
    """cpu, or the current CUDA device with its index (NCCL's `device_id` needs one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device("cuda", torch.cuda.current_device())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cpu_tiny", "vits14"], help="recipes in configs/pretrain")
    parser.add_argument("--images", type=int, default=0,
                        help="images per step (0: the recipe's batch with --recipe, else 64 for cpu_tiny, 4 otherwise)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (0: no timing, only --profile)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--recipe", action="store_true",
                        help="the recipe's batch size, precision, drop path and activation checkpointing")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="overrides the precision")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["ours", "plain", "timm"])
    parser.add_argument("--timing", choices=["auto", "interleaved", "sequential"], default="auto",
                        help="auto: interleaved rounds on CPU, one variant after the other on CUDA")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON object to this file")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="also profile each variant's step (traces, profile.json, profile.md in DIR)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps in each profile, after one warm-up")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every model")
    args = parser.parse_args()
    if args.rounds < 1 and args.profile is None:
        parser.error("--rounds 0 times nothing: it needs --profile")
    device = resolve_device(args.device)
    interleaved = args.timing == "interleaved" or (args.timing == "auto" and device.type == "cpu")
    try:
        results = {name: bench_model(name, args.images, args.rounds, device, args.variants, args.recipe,
                                     args.precision, args.overrides, interleaved, args.profile, args.profile_steps)
                   for name in args.models}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    report = {"bench": "train_step", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "timing": "interleaved" if interleaved else "sequential",
              "rounds": args.rounds, "results": results, "headline": train_headline(results)}
    if args.profile is not None:
        write_profiles(results, args.profile)
    text = json.dumps(report, indent=2)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
