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
- copydetect: the weight-free copy-detection descriptor of `curate.embedding.copydetect` (flip-invariant, crop- and
  re-encoding-tolerant); the default, and what the dedup quality test uses (numbers in that module).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from curate.embedding.config import KINDS, EmbedConfig, embed_image_size
from dinoforge.config import ConfigError
from dinoforge.data.decode import decode_image as decode_pixels
from dinoforge.data.decode import to_rgb
from dinoforge.launch import resolve_device
from dinoforge.models.loading import RANDOM_WEIGHTS, is_run_directory, load_backbone
from dinoforge.precision import autocast

log = logging.getLogger(__name__)

class Embedder:
    """A named function from decoded images to float16, L2-normalised vectors."""

    def __init__(self, name: str, dim: int, transform: Callable[[Image.Image], torch.Tensor],
                 forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | None = None,
                 decode_size: int | None = None, autocast: bool = True) -> None:
        self.name = name
        self.dim = dim
        self.transform = transform
        self.device = device or torch.device("cpu")
        self.decode_size = decode_size  # JPEG draft decoding may stop at this side (faster decoding of big files)
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
    from dinoforge.data.transforms import EvalTransformConfig, make_eval_transform

    return make_eval_transform(EvalTransformConfig(resize_size=image_size, crop_size=image_size))


def _vit_embedder(cfg: EmbedConfig, device: torch.device, pretrained: bool) -> Embedder:
    if pretrained and (not cfg.weights or cfg.weights == RANDOM_WEIGHTS):
        raise ConfigError("embed.kind=dinov2 needs embed.weights: a pretrain run directory, or a checkpoint, "
                          "release or official DINOv2 file")
    # Official weights carry a 518 px position grid: built at the input size, the file's grid is interpolated once.
    size = embed_image_size(cfg)
    model_cfg = replace(cfg, img_size=size, weights=cfg.weights if pretrained else RANDOM_WEIGHTS)
    model = load_backbone(model_cfg, key="embed.weights", interpolate_pos_embed=True).to(device)
    if not pretrained:
        name = f"random_vit-{cfg.arch}{cfg.patch_size}-seed{cfg.seed}-{size}"
    elif is_run_directory(cfg.weights):  # our own pretrain run: its model config sets the architecture
        name = f"dinov2-run-{Path(cfg.weights).resolve().name}-{size}"
    else:
        name = f"dinov2-{cfg.arch}{cfg.patch_size}-{Path(cfg.weights).stem}-{size}"
    return Embedder(name, model.embed_dim, vit_transform(size), model, device, size)


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
    return Embedder(name, dim, preprocess, model.encode_image, device, embed_image_size(cfg))


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
        from curate.embedding.copydetect import CopyDetectDescriptor

        desc = CopyDetectDescriptor()
        return Embedder(desc.name, desc.dim, desc.transform, desc, device, desc.input_size, autocast=False)
    raise ValueError(f"embed.kind={cfg.kind!r}: use one of {', '.join(KINDS)}")


def decode_image(item: Image.Image | bytes | bytearray | memoryview, draft_size: int | None = None,
                 max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image or encoded bytes, by the one decoder under its default policy
    (`dinoforge.data.decode`: EXIF orientation, alpha on white, 16-bit greyscale scaled), so curation embeds the
    pixels training and evaluation see. `draft_size` lets JPEGs decode downscaled (kept at least that large)."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, bytes | bytearray | memoryview):
        return decode_pixels(bytes(item), draft_size=draft_size, max_pixels=max_pixels)
    raise TypeError(f"expected a PIL image or encoded bytes, got {type(item).__name__}")


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
                 num_workers: int = 4, progress: bool = True, max_pixels: int | None = None) -> np.ndarray:
    """float16 [N, dim] L2-normalised embeddings of `images`, in order; `max_pixels` is ingest's limit (the images
    passed it there, so embedding must not refuse them under a lower default).

    Decoding and transforms run `num_workers` threads ahead of the model (two batches prefetched).
    """
    draft = 2 * embedder.decode_size if embedder.decode_size else None

    def prepare(position: int, item) -> torch.Tensor:
        try:
            return embedder.transform(decode_image(item, draft, max_pixels))
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
