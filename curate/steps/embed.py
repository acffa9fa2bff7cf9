"""The embed step: float16 L2-normalised embeddings of every accepted row (pool, seeds, evals), partition by
partition, under embeddings/MODEL/ (and under the dedup embedding's folder when `dedup_embed` names another one)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.dataset as ds

from curate.embedding.store import EmbeddingStore
from curate.errors import CurateError
from curate.manifest import read_manifest
from curate.rundir import THIS_CALL, RunDir
from curate.sources.sample_reader import SampleReader

if TYPE_CHECKING:
    from curate.config import CurateConfig
    from curate.steps.runner import StepContext

log = logging.getLogger(__name__)


def config(cfg: CurateConfig) -> dict:
    return {"embed": dataclasses.asdict(cfg.embed),
            "dedup_embed": dataclasses.asdict(cfg.dedup_embed) if cfg.dedup_embed else None}


def run(cfg: CurateConfig, context: StepContext) -> dict | None:
    """Embed the partitions of this call; the summary once every partition of every embedding is done."""
    from curate.embedding.embed import build_embedder, embed_images  # torch: imported only when embedding

    rundir = context.rundir
    embedders, settings = [build_embedder(cfg.embed)], [cfg.embed]
    if cfg.dedup_embed is not None:
        second = build_embedder(cfg.dedup_embed)
        if second.name != embedders[0].name:
            embedders.append(second)
            settings.append(cfg.dedup_embed)
    stores = [EmbeddingStore(rundir.embeddings(e.name), cfg.partitions) for e in embedders]
    for store in stores:
        rundir.prepare_output(store.root, context.fingerprint, fresh=context.force)
    wanted = context.partitions if context.partitions is not None else range(cfg.partitions)
    n_images, seconds = 0, 0.0
    with SampleReader() as reader:
        for p in wanted:  # one partition of the manifest in memory at a time, its accepted rows only
            sub = read_manifest(rundir.manifest, ["uid", "file", "member", "offset", "size"], partitions=[p],
                                where=ds.field("reject_reason").is_null()).to_pylist()
            for embedder, setting, store in zip(embedders, settings, stores, strict=True):
                if store.has_partition(p):
                    continue
                start = time.perf_counter()
                emb = (embed_images(embedder, _SampleBytes(sub, reader), setting.batch_size, setting.num_workers,
                                    max_pixels=cfg.ingest.limits.max_pixels)
                       if sub else np.zeros((0, embedder.dim), np.float16))
                store.write_partition(p, [r["uid"] for r in sub], emb)
                elapsed = time.perf_counter() - start
                seconds, n_images = seconds + elapsed, n_images + len(sub)
                log.info("embed %s partition %d/%d: %d images, %.1f images/s", embedder.name, p + 1,
                         cfg.partitions, len(sub), len(sub) / max(elapsed, 1e-9))
    missing = sorted({p for store in stores for p in store.missing_partitions()})
    if missing:
        log.info("embed: %d partitions still to do (%s...); the step completes when all are done", len(missing),
                 missing[:8])
        return None
    for embedder, store in zip(embedders, stores, strict=True):
        store.write_index(embedder.name, embedder.dim)
    return {"model": embedders[0].name, "dim": embedders[0].dim, "dedup_model": embedders[-1].name
            if cfg.dedup_embed is not None else embedders[0].name,
            THIS_CALL: {"embedded_now": n_images, "images_per_s": round(n_images / seconds, 2) if seconds else None}}


class _SampleBytes:
    """The bytes of manifest rows, read lazily in order; sized, so the embedding progress bar knows its total."""

    def __init__(self, rows: list[dict], reader: SampleReader) -> None:
        self.rows, self.reader = rows, reader

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        for r in self.rows:
            yield self.reader.read(r["file"], r["member"], r["offset"], r["size"])


def embedding_store(rundir: RunDir, cfg: CurateConfig, purpose: str = "model") -> EmbeddingStore:
    """The embeddings this step wrote: "model" (clustering, retrieval) or "dedup_model"."""
    marker = rundir.read_marker("embed") or {}
    model = marker.get("summary", {}).get(purpose)
    if not model:
        raise CurateError(f"{rundir.marker('embed')} names no {purpose}: rerun the embed step")
    return EmbeddingStore(rundir.embeddings(model), cfg.partitions)
