"""Image embedders for curation: DINOv2-style ViTs, open_clip, a random-init ViT, and weight-free descriptors.

`build_embedder(EmbedConfig)` returns an `Embedder`: `.name` (its folder under embeddings/), `.dim`, `.transform`
(PIL image -> tensor) and `.embed_batch(tensor batch) -> float16 [B, dim]`, L2-normalised. `embed_images` runs one
over an iterable of PIL images or encoded bytes, decoding in worker threads (PIL releases the GIL while decoding
and resizing) while the model runs, with a progress bar and the images/s logged.

Kinds:
- dinov2: a `pretrain` checkpoint or release, or official DINOv2 weights (any layout `load_pretrained` reads);
  the normalised CLS token.
- open_clip: an open_clip model from a local weights file (never downloaded at run time).
- random_vit: a seeded random-init ViT, for tests of the plumbing (its neighbours mean little).
- copydetect: the weight-free copy-detection descriptor of `curate.copydetect` (flip-invariant, crop- and
  re-encoding-tolerant); the default, and what the dedup quality test uses (numbers in that module).
"""

from __future__ import annotations

import io
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from curate.decode import to_rgb
from dinoforge.config import ConfigError
from dinoforge.launch import resolve_device
from dinoforge.precision import autocast

log = logging.getLogger(__name__)

KINDS = ("dinov2", "open_clip", "random_vit", "copydetect")
# DINOv2's dedup / decontamination cosines (Oquab et al. 2023), chosen for SSCD copy-detection network features; the
# default for the network embeddings. The weight-free copydetect descriptor has its own (see `default_thresholds`).
NETWORK_THRESHOLDS = (0.6, 0.45)


def default_thresholds(kind: str) -> tuple[float, float]:
    """(dedup, decontamination) cosine thresholds that fit an embedding of `kind`: the defaults of `dedup.threshold`
    and `dedup.eval_threshold`. Unrelated photos sit near cosine 0.6 under copydetect, so DINOv2's 0.6 would remove
    most of a pool there."""
    if kind == "copydetect":
        from curate.copydetect import RECOMMENDED_EVAL_THRESHOLD, RECOMMENDED_THRESHOLD

        return RECOMMENDED_THRESHOLD, RECOMMENDED_EVAL_THRESHOLD
    return NETWORK_THRESHOLDS


@dataclass
class EmbedConfig:
    """Which embedding the curation run computes (one folder per embedder under embeddings/)."""

    kind: str = "copydetect"  # dinov2 | open_clip | random_vit | copydetect
    arch: str = "vit_small"  # dinov2 / random_vit: a dinoforge.models factory name
    patch_size: int = 14
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"  # "swiglufused" for the official ViT-g
    weights: str = ""  # dinov2: a pretrain run directory, or a checkpoint / release / official weights file
    open_clip_model: str = "ViT-B-32"  # open_clip: architecture name
    open_clip_pretrained: str = ""  # open_clip: local weights file
    image_size: int = 224  # network input side (resize shorter side, centre crop)
    batch_size: int = 64
    num_workers: int = 4  # decoding threads; 0 decodes in the calling thread
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    seed: int = 0  # random_vit initialisation

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"embed.kind={self.kind!r}: use one of {', '.join(KINDS)}")
        if self.batch_size < 1 or self.num_workers < 0 or self.image_size < 16:
            raise ValueError("embed.batch_size must be >= 1, embed.num_workers >= 0 and embed.image_size >= 16")


class Embedder:
    """A named function from decoded images to float16, L2-normalised vectors."""

    def __init__(self, name: str, dim: int, transform: Callable[[Image.Image], torch.Tensor],
                 forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | None = None,
                 decode_size: int | None = None, recommended_thresholds: tuple[float, float] | None = None,
                 autocast: bool = True) -> None:
        self.name = name
        self.dim = dim
        self.transform = transform
        self.device = device or torch.device("cpu")
        self.decode_size = decode_size  # JPEG draft decoding may stop at this side (faster decoding of big files)
        # (dedup, decontamination) cosine thresholds measured for this embedding; None: use the config's.
        self.recommended_thresholds = recommended_thresholds
        # bf16 autocast on CUDA for networks; off for descriptors whose thresholds were calibrated in fp32
        self.autocast = autocast
        self._forward = forward

    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        """float16 [B, dim], L2-normalised, for a batch of transformed images."""
        with torch.inference_mode():
            batch = batch.to(self.device, non_blocking=True)
            with autocast(self.device, "bf16" if self.device.type == "cuda" and self.autocast else "fp32"):
                out = self._forward(batch)
            out = F.normalize(out.float(), dim=-1)
        if out.shape[-1] != self.dim:
            raise RuntimeError(f"embedder {self.name} returned dim {out.shape[-1]}, expected {self.dim}")
        return out.cpu().numpy().astype(np.float16)

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dim={self.dim}, device={self.device})"


def vit_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation's transform at `image_size`: resize the shorter side (bicubic), centre crop, ImageNet-normalise."""
    from evaluation.config import EvalTransformConfig
    from evaluation.transform import make_eval_transform

    return make_eval_transform(EvalTransformConfig(resize_size=image_size, crop_size=image_size))


def _vit_embedder(cfg: EmbedConfig, device: torch.device, pretrained: bool) -> Embedder:
    from dinoforge.models import build_vit, load_pretrained

    if pretrained and not cfg.weights:
        raise ConfigError("embed.kind=dinov2 needs embed.weights: a pretrain run directory, or a checkpoint, "
                          "release or official DINOv2 file")
    if pretrained and Path(cfg.weights).is_dir():
        from dinoforge.models.export_reader import load_exported_backbone

        # our own pretrain run: its model config sets the architecture, the embed.arch fields are not used
        model = load_exported_backbone(cfg.weights).to(device)
        name = f"dinov2-run-{Path(cfg.weights).resolve().name}-{cfg.image_size}"
        return Embedder(name, model.embed_dim, vit_transform(cfg.image_size), model, device, cfg.image_size)
    if pretrained and not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"embed.weights={cfg.weights!r}: no such file or pretrain run directory")
    # fork_rng: a random-init model depends on cfg.seed only, and the caller's RNG stream is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_vit(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.image_size,
                          num_register_tokens=cfg.num_register_tokens, ffn_layer=cfg.ffn_layer)
    if pretrained:
        # Official weights carry a 518 px position grid: interpolate it once to our input size.
        load_pretrained(model, cfg.weights, ignore_heads=True, interpolate_pos_embed=True)
        name = f"dinov2-{cfg.arch}{cfg.patch_size}-{Path(cfg.weights).stem}-{cfg.image_size}"
    else:
        name = f"random_vit-{cfg.arch}{cfg.patch_size}-seed{cfg.seed}-{cfg.image_size}"
    model.eval().to(device)
    return Embedder(name, model.embed_dim, vit_transform(cfg.image_size), model, device, cfg.image_size)


def _open_clip_embedder(cfg: EmbedConfig, device: torch.device) -> Embedder:
    import open_clip

    if not cfg.open_clip_pretrained or not Path(cfg.open_clip_pretrained).is_file():
        raise FileNotFoundError(f"embed.open_clip_pretrained={cfg.open_clip_pretrained!r}: give a local weights file "
                                "(weights are never downloaded at run time)")
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.open_clip_model,
                                                                 pretrained=cfg.open_clip_pretrained)
    model.eval().to(device)
    dim = int(model.visual.output_dim)
    name = f"open_clip-{cfg.open_clip_model}-{Path(cfg.open_clip_pretrained).stem}"
    return Embedder(name, dim, preprocess, model.encode_image, device, cfg.image_size)


def build_embedder(cfg: EmbedConfig) -> Embedder:
    """The embedder `cfg` describes, on its device, in eval mode."""
    device = resolve_device(cfg.device)
    if cfg.kind == "dinov2":
        return _vit_embedder(cfg, device, pretrained=True)
    if cfg.kind == "random_vit":
        return _vit_embedder(cfg, device, pretrained=False)
    if cfg.kind == "open_clip":
        return _open_clip_embedder(cfg, device)
    if cfg.kind == "copydetect":
        from curate.copydetect import RECOMMENDED_EVAL_THRESHOLD, RECOMMENDED_THRESHOLD, CopyDetectDescriptor

        desc = CopyDetectDescriptor()
        return Embedder(desc.name, desc.dim, desc.transform, desc, device, desc.input_size,
                        (RECOMMENDED_THRESHOLD, RECOMMENDED_EVAL_THRESHOLD), autocast=False)
    raise ValueError(f"embed.kind={cfg.kind!r}: use one of {', '.join(KINDS)}")


def decode_image(item: Image.Image | bytes | bytearray | memoryview, draft_size: int | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image or encoded bytes (EXIF orientation applied; alpha and 16-bit greyscale
    converted as the report shows them, by `curate.decode.to_rgb`)."""
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, bytes | bytearray | memoryview):
        image = Image.open(io.BytesIO(item))
        if draft_size and image.format == "JPEG":
            # DCT-domain downscaling while decoding; draft keeps the image at least this large.
            image.draft("RGB", (draft_size, draft_size))
    else:
        raise TypeError(f"expected a PIL image or encoded bytes, got {type(item).__name__}")
    return to_rgb(ImageOps.exif_transpose(image))


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def embed_images(embedder: Embedder, images: Iterable[Image.Image | bytes], batch_size: int = 64,
                 num_workers: int = 4, progress: bool = True) -> np.ndarray:
    """float16 [N, dim] L2-normalised embeddings of `images`, in order.

    Decoding and transforms run `num_workers` threads ahead of the model (two batches prefetched).
    """
    draft = 2 * embedder.decode_size if embedder.decode_size else None

    def prepare(position: int, item) -> torch.Tensor:
        try:
            return embedder.transform(decode_image(item, draft))
        except Exception as err:  # name the failing input: the batch alone does not say which one it was
            raise ValueError(f"image #{position} of the input cannot be embedded: {type(err).__name__}: {err}. "
                             "Inputs should pass ingest's decoding checks first") from err

    total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
    outputs: list[np.ndarray] = []
    start, count = time.perf_counter(), 0
    bar = tqdm(total=total, desc=f"embed {embedder.name}", unit="img", disable=not progress)
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        pending: deque[list[Future] | list[torch.Tensor]] = deque()
        batches = _batched(enumerate(images), batch_size)

        def submit_next() -> None:
            batch = next(batches, None)
            if batch is not None:
                pending.append([pool.submit(prepare, *b) for b in batch] if pool else [prepare(*b) for b in batch])

        for _ in range(2 if pool else 1):
            submit_next()
        while pending:
            current = pending.popleft()
            submit_next()
            tensors = [f.result() if isinstance(f, Future) else f for f in current]
            outputs.append(embedder.embed_batch(torch.stack(tensors)))
            count += len(tensors)
            bar.update(len(tensors))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    seconds = time.perf_counter() - start
    log.info("embedded %d images with %s in %.1fs (%.1f images/s)", count, embedder.name, seconds,
             count / max(seconds, 1e-9))
    if not outputs:
        return np.zeros((0, embedder.dim), dtype=np.float16)
    return np.concatenate(outputs)
