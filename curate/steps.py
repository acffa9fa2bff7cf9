"""One function per curation step: (config) -> artefacts in the run directory + a `_SUCCESS.<step>` marker.

Every step skips itself when its marker is current (see `curate.rundir`), writes its artefacts atomically, and
recomputes its results from its inputs rather than from its own earlier output, so a run killed at any point and
started again ends with the same manifest and shards as an uninterrupted one. Embedding, the dedup queries and
shard writing work partition by partition (a stable hash of the uid); `partitions=[...]` runs only some of them,
which is how a Slurm array task calls them; the step's marker is written by whichever call finds every partition
done.

The CLI (`python -m curate`) and the Slurm launcher are thin wrappers around these functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from curate.config import CurateConfig
from curate.errors import CurateError
from curate.ingest import ingest_sources, source_name
from curate.manifest import (
    CLUSTER_PREFIX,
    DEDUP_SCHEMA,
    RETRIEVE_SCHEMA,
    check_accounting,
    cluster_columns,
    derive_status,
    drop_columns,
    mask_of,
    owning_step,
    read_manifest,
    set_columns,
    write_manifest,
)
from curate.report import write_report
from curate.rundir import STEPS, RunDir, downstream
from curate.shard_plan import PARTS_DIR, finished_shard, image_extension, plan_all_shards, record_shard, sample_metadata
from curate.shards import ShardWriter, shard_name, write_index
from curate.sources import SampleReader
from curate.store import EmbeddingStore
from dinoforge.atomic import atomic_write, atomic_write_json
from dinoforge.config import save_config, to_yaml

log = logging.getLogger(__name__)

PARTITIONED_STEPS = ("embed", "dedup", "shard")


@dataclass
class StepResult:
    """What one call of a step did."""

    step: str
    status: str  # "done", "skipped" (marker current) or "partial" (only some partitions ran)
    summary: dict = field(default_factory=dict)


# --- the step runner ---------------------------------------------------------------------------------------------


def _sections(cfg: CurateConfig) -> Callable[[str], dict]:
    """The config section each step's output depends on (its fingerprint input)."""
    asdict = dataclasses.asdict

    def section(step: str) -> dict:
        return {
            "ingest": lambda: {"sources": [asdict(s) for s in cfg.sources], "seeds": [asdict(s) for s in cfg.seeds],
                               "evals": [asdict(s) for s in cfg.evals], "ingest": asdict(cfg.ingest),
                               "partitions": cfg.partitions},
            "embed": lambda: {"embed": asdict(cfg.embed),
                              "dedup_embed": asdict(cfg.dedup_embed) if cfg.dedup_embed else None},
            "dedup": lambda: {"dedup": asdict(cfg.dedup), "nn_sample": cfg.report.nn_sample, "seed": cfg.report.seed},
            "cluster": lambda: asdict(cfg.cluster),
            "retrieve": lambda: {"retrieve": asdict(cfg.retrieve), "select": asdict(cfg.select)},
            "shard": lambda: asdict(cfg.shards),
            "report": lambda: {"report": asdict(cfg.report), "thresholds": [cfg.dedup.threshold,
                                                                             cfg.dedup.eval_threshold]},
        }[step]()

    return section


def _execute(cfg: CurateConfig, step: str, body: Callable[[RunDir, str], dict | None], force: bool) -> StepResult:
    run = RunDir(cfg.run_dir)
    expected = run.expected_fingerprint(step, _sections(cfg), required=step != "report")
    if force:
        run.marker(step).unlink(missing_ok=True)
    elif run.is_done(step, expected):
        log.info("step %s: complete (%s), skipping", step, run.marker(step))
        return StepResult(step, "skipped", (run.read_marker(step) or {}).get("summary", {}))
    started = time.time()
    log.info("step %s: starting in %s", step, run.root)
    run.invalidate_downstream(step)
    _reset_later_columns(run, step)
    summary = body(run, expected)
    if summary is None:
        return StepResult(step, "partial")
    run.write_marker(step, expected, summary, started)
    log.info("step %s: done in %.1fs: %s", step, time.time() - started, summary)
    return StepResult(step, "done", summary)


def _reset_later_columns(run: RunDir, step: str) -> None:
    """Drop the manifest columns of the steps after `step` (their markers are gone, they will be redone), so that no
    row keeps a status from a step that is no longer current, such as `not_selected` from an earlier retrieve."""
    try:
        columns = pq.read_schema(run.manifest).names
    except (FileNotFoundError, pa.ArrowInvalid):  # none yet, or damaged: ingest rebuilds it, other steps report it
        return
    later = [c for c in columns if owning_step(c) in downstream(step)]
    if later:
        log.info("step %s runs: clearing the manifest columns of later steps (%s)", step, ", ".join(later))
        write_manifest(derive_status(drop_columns(read_manifest(run.manifest), later)), run.manifest)


def _save_config(cfg: CurateConfig) -> None:
    """config.yaml of the run, rewritten only when it changed: a finished run on a read-only disk reruns as a no-op."""
    path = cfg.run_dir / "config.yaml"
    if not path.is_file() or path.read_text() != to_yaml(cfg):
        save_config(cfg, cfg.run_dir)


def run_step(step: str, cfg: CurateConfig, partitions: Sequence[int] | None = None,
             force: bool = False) -> StepResult:
    """Run one step by name; `partitions` (embed, dedup and shard only) runs a subset, as one Slurm array task."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
    if partitions is not None and step not in PARTITIONED_STEPS:
        raise ValueError(f"step {step!r} does not run per partition (only {', '.join(PARTITIONED_STEPS)} do)")
    if partitions is not None and force:
        raise ValueError("force with partitions would discard the partitions other tasks finished; force the whole "
                         "step once (no partitions) instead")
    _save_config(cfg)
    fn = STEP_FUNCTIONS[step]
    return fn(cfg, partitions=partitions, force=force) if step in PARTITIONED_STEPS else fn(cfg, force=force)


def run_all(cfg: CurateConfig, force: bool = False) -> list[StepResult]:
    """Every step in order; finished steps are skipped. `force` redoes them all."""
    _save_config(cfg)
    return [STEP_FUNCTIONS[step](cfg, force=force) for step in STEPS]


# --- ingest ------------------------------------------------------------------------------------------------------


def ingest(cfg: CurateConfig, force: bool = False) -> StepResult:
    """Read every source; write manifest.parquet with one row per input."""

    def body(run: RunDir, expected: str) -> dict:
        role_sources = ([("pool", s) for s in cfg.sources] + [("seed", s) for s in cfg.seeds]
                        + [("eval", s) for s in cfg.evals])
        table = ingest_sources(role_sources, cfg.ingest, cfg.partitions)
        write_manifest(table, run.manifest)
        counts = check_accounting(table)
        content = hashlib.sha256()
        for uid, sha in zip(table.column("uid").to_pylist(), table.column("sha256").to_pylist(), strict=True):
            content.update(f"{uid} {sha}\n".encode())
        return {"inputs": table.num_rows, "pool_ok": counts["ok"], "pool_rejected": counts["rejected"],
                **{f"{role}_rows": int(mask_of(table, role).sum()) for role in ("seed", "eval")},
                "content_sha256": content.hexdigest()}

    return _execute(cfg, "ingest", body, force)


# --- embed -------------------------------------------------------------------------------------------------------


def embed(cfg: CurateConfig, partitions: Sequence[int] | None = None, force: bool = False) -> StepResult:
    """Embed every accepted row (pool, seeds, evals) partition by partition into embeddings/MODEL/ (and into the
    dedup embedding's folder when `dedup_embed` names a different one)."""
    from curate.embed import build_embedder, embed_images  # torch is imported only by the steps that need it

    def body(run: RunDir, expected: str) -> dict | None:
        embedders, settings = [build_embedder(cfg.embed)], [cfg.embed]
        if cfg.dedup_embed is not None:
            second = build_embedder(cfg.dedup_embed)
            if second.name != embedders[0].name:
                embedders.append(second)
                settings.append(cfg.dedup_embed)
        stores = [EmbeddingStore(run.embeddings(e.name), cfg.partitions) for e in embedders]
        for store in stores:
            run.prepare_output(store.root, expected, fresh=force)
        table = read_manifest(run.manifest)
        accepted = ~mask_of(table, statuses=["rejected"])
        part_of = table.column("partition").to_numpy()
        wanted = partitions if partitions is not None else range(cfg.partitions)
        n_images, seconds = 0, 0.0
        with SampleReader() as reader:
            for p in wanted:
                rows = np.nonzero(accepted & (part_of == p))[0]
                sub = table.select(["uid", "file", "member", "offset", "size"]).take(
                    pa.array(rows, type=pa.int64())).to_pylist()
                for embedder, setting, store in zip(embedders, settings, stores, strict=True):
                    if store.has_partition(p):
                        continue
                    start = time.perf_counter()
                    emb = (embed_images(embedder, _SampleBytes(sub, reader), setting.batch_size, setting.num_workers)
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
                if cfg.dedup_embed is not None else embedders[0].name, "embedded_now": n_images,
                "images_per_s": round(n_images / seconds, 2) if seconds else None}

    return _execute(cfg, "embed", body, force)


class _SampleBytes:
    """The bytes of manifest rows, read lazily in order; sized, so the embedding progress bar knows its total."""

    def __init__(self, rows: list[dict], reader: SampleReader) -> None:
        self.rows, self.reader = rows, reader

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        for r in self.rows:
            yield self.reader.read(r["file"], r["member"], r["offset"], r["size"])


def _embedding_store(run: RunDir, cfg: CurateConfig, purpose: str = "model") -> EmbeddingStore:
    """The embeddings the embed step wrote: "model" (clustering, retrieval) or "dedup_model"."""
    marker = run.read_marker("embed") or {}
    model = marker.get("summary", {}).get(purpose)
    if not model:
        raise CurateError(f"{run.marker('embed')} names no {purpose}: rerun the embed step")
    return EmbeddingStore(run.embeddings(model), cfg.partitions)


# --- dedup -------------------------------------------------------------------------------------------------------


def _warn_uncalibrated_thresholds(cfg: CurateConfig) -> None:
    """The copydetect descriptor puts unrelated photos at a median cosine of 0.61, so thresholds below its calibrated
    ones (DINOv2's 0.6 / 0.45, made for SSCD-like copy features) remove much of the pool as copies."""
    from curate.copydetect import RECOMMENDED_EVAL_THRESHOLD, RECOMMENDED_THRESHOLD

    if (cfg.dedup_embed or cfg.embed).kind != "copydetect":
        return
    below = [f"dedup.{key}={value} is below the copydetect embedding's calibrated {calibrated}"
             for key, value, calibrated in (("threshold", cfg.dedup.threshold, RECOMMENDED_THRESHOLD),
                                            ("eval_threshold", cfg.dedup.eval_threshold, RECOMMENDED_EVAL_THRESHOLD))
             if value < calibrated]
    if below:
        log.warning("%s: unrelated photos will be removed as copies; leave the thresholds unset (the embedding's "
                    "defaults) unless that is intended", "; ".join(below))


def dedup(cfg: CurateConfig, partitions: Sequence[int] | None = None, force: bool = False) -> StepResult:
    """Exact (sha256) then near-duplicate (kNN-graph components) removal, and decontamination against evals.

    The kNN queries run per partition (dedup/queries/part-PPPPP.npz); the merge runs once all exist.
    """
    from curate.dedup import exact_duplicates
    from curate.dedup_partitions import PartitionQueries, merge_partitions, query_partition

    def body(run: RunDir, expected: str) -> dict | None:
        _warn_uncalibrated_thresholds(cfg)
        table = derive_status(drop_columns(read_manifest(run.manifest), DEDUP_SCHEMA.names))
        store = _embedding_store(run, cfg, "dedup_model")
        uid_col, sha_col = table.column("uid").to_pylist(), table.column("sha256").to_pylist()
        part_col = table.column("partition").to_numpy()
        pool = np.nonzero(mask_of(table, "pool") & ~mask_of(table, statuses=["rejected"]))[0]
        pool_uids = [uid_col[i] for i in pool]
        exact = exact_duplicates([sha_col[i] for i in pool], pool_uids, cfg.dedup.keep)
        base = pool[exact < 0]  # manifest rows of the deduplication base: one image per distinct file
        base_uids = [uid_col[i] for i in base]
        queries_dir = run.dedup / "queries"
        run.prepare_output(queries_dir, expected, fresh=force)
        todo = [p for p in (partitions if partitions is not None else range(cfg.partitions))
                if not (queries_dir / f"part-{p:05d}.npz").is_file()]
        evals = np.nonzero(mask_of(table, "eval", ["ok"]))[0]
        eval_uids = [uid_col[i] for i in evals]
        nn_rows = _nn_sample(len(base), cfg)
        if todo:
            emb = store.gather(base_uids).astype(np.float32)
            eval_emb = store.gather(eval_uids).astype(np.float32) if eval_uids else None
            base_part = part_col[base]
            for p in tqdm(todo, desc="dedup queries", unit="partition"):
                rows = np.nonzero(base_part == p)[0]
                found = query_partition(emb, rows, eval_emb, cfg.dedup.k, cfg.dedup.threshold,
                                        nn_rows[base_part[nn_rows] == p], cfg.dedup.use_gpu)
                found.save(queries_dir / f"part-{p:05d}.npz")
        missing = [p for p in range(cfg.partitions) if not (queries_dir / f"part-{p:05d}.npz").is_file()]
        if missing:
            log.info("dedup: %d partitions still to query (%s...); the merge runs when all are done", len(missing),
                     missing[:8])
            return None
        parts = [PartitionQueries.load(queries_dir / f"part-{p:05d}.npz") for p in range(cfg.partitions)]
        merged = merge_partitions(len(base), parts, base_uids, cfg.dedup.eval_threshold, cfg.dedup.keep)

        n = table.num_rows
        dup_of: list[str | None] = [None] * n
        dup_kind: list[str | None] = [None] * n
        component: list[int | None] = [None] * n
        contaminated: list[str | None] = [None] * n
        eval_sim: list[float | None] = [None] * n
        nn_sim: list[float | None] = [None] * n
        for j, i in enumerate(base.tolist()):
            component[i] = int(merged.component[j])
            if merged.duplicate_of[j] >= 0:
                dup_of[i], dup_kind[i] = base_uids[merged.duplicate_of[j]], "near"
            if merged.contaminated_by[j] >= 0:
                contaminated[i] = eval_uids[merged.contaminated_by[j]]
            if not np.isnan(merged.eval_sim[j]):
                eval_sim[i] = float(merged.eval_sim[j])
            if not np.isnan(merged.nn_sim[j]):
                nn_sim[i] = float(merged.nn_sim[j])
        for k in np.nonzero(exact >= 0)[0]:  # an exact copy shares its group and fate with the file it copies
            i, kept = int(pool[k]), int(pool[exact[k]])
            dup_of[i], dup_kind[i] = uid_col[kept], "exact"
            component[i], contaminated[i], eval_sim[i] = component[kept], contaminated[kept], eval_sim[kept]
        table = set_columns(table, {"duplicate_of": dup_of, "duplicate_kind": dup_kind, "component": component,
                                    "contaminated_by": contaminated, "eval_similarity": eval_sim,
                                    "nn_similarity": nn_sim}, DEDUP_SCHEMA)
        table = derive_status(table)
        _write_dedup_groups(run, table)
        write_manifest(table, run.manifest)
        counts = check_accounting(table)
        return {"exact_duplicates": int((exact >= 0).sum()), "near_duplicates": int((merged.duplicate_of >= 0).sum()),
                "graph_edges": merged.n_edges, "contaminated": counts["contaminated"],
                "kept": counts["ok"] + counts["selected"] + counts["not_selected"],
                "components": int(len(np.unique(merged.component)))}

    return _execute(cfg, "dedup", body, force)


def _nn_sample(n: int, cfg: CurateConfig) -> np.ndarray:
    """Base rows whose nearest-neighbour similarity is measured for the report (bounded, seeded, sorted)."""
    size = min(n, cfg.report.nn_sample)
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(cfg.report.seed).choice(n, size=size, replace=False)).astype(np.int64)


def _write_dedup_groups(run: RunDir, table: pa.Table) -> None:
    """dedup/groups.parquet: the pool rows of every duplicate group (kept and removed) and the contaminated ones."""
    removed = pc.is_valid(table.column("duplicate_of"))
    touched = pc.is_valid(table.column("contaminated_by"))
    kept_of_group = pc.is_in(table.column("uid"), value_set=table.filter(removed).column("duplicate_of"))
    cols = ["uid", "component", "duplicate_of", "duplicate_kind", "contaminated_by", "eval_similarity", "status"]
    groups = table.filter(pc.or_(pc.or_(removed, touched), kept_of_group)).select(cols)
    atomic_write(run.dedup / "groups.parquet", lambda fh: pq.write_table(groups, fh))


# --- cluster -----------------------------------------------------------------------------------------------------


def cluster(cfg: CurateConfig, force: bool = False) -> StepResult:
    """Hierarchical k-means over the deduplicated pool; seed images get the clusters of their nearest centroids."""
    from curate.cluster import assign_to_centroids, hierarchical_kmeans, parent_clusters

    def body(run: RunDir, expected: str) -> dict:
        table = read_manifest(run.manifest)
        table = drop_columns(table, cluster_columns(table))
        store = _embedding_store(run, cfg)
        uid_col = table.column("uid").to_pylist()
        pool = np.nonzero(mask_of(table, "pool", ["ok", "selected", "not_selected"]))[0]
        seeds = np.nonzero(mask_of(table, "seed", ["ok"]))[0]
        if pool.size == 0:
            raise CurateError("nothing to cluster: no pool image survived ingest and dedup (see the manifest's "
                              "status and reason columns)")
        emb = store.gather([uid_col[i] for i in pool]).astype(np.float32)
        hierarchy = hierarchical_kmeans(emb, cfg.cluster)
        seed_assign = None
        if seeds.size:  # seeds follow the hierarchy from their nearest finest-level centroid upwards
            seed_emb = store.gather([uid_col[i] for i in seeds]).astype(np.float32)
            seed_assign = [assign_to_centroids(seed_emb, hierarchy[0].centroids, cfg.cluster.use_gpu)]
            for level in range(len(hierarchy) - 1):
                seed_assign.append(parent_clusters(hierarchy, level, cfg.cluster.use_gpu)[seed_assign[-1]])
        run.clusters.mkdir(parents=True, exist_ok=True)
        columns = {}
        for level, (centroids, assign) in enumerate(hierarchy):
            centroids = np.asarray(centroids, dtype=np.float32)
            atomic_write(run.clusters / f"level{level + 1}_centroids.npy", lambda fh, c=centroids: np.save(fh, c))
            col = np.full(table.num_rows, -1, dtype=np.int64)
            col[pool] = assign
            if seed_assign is not None:
                col[seeds] = seed_assign[level]
            columns[f"{CLUSTER_PREFIX}{level + 1}"] = pa.array(col, type=pa.int32(), mask=col < 0)
        table = set_columns(table, columns)
        write_manifest(table, run.manifest)
        summary = {"levels": len(hierarchy), "clusters_per_level": [int(len(c)) for c, _ in hierarchy],
                   "points": int(len(pool)), "max_points_per_centroid": cfg.cluster.max_points_per_centroid}
        atomic_write_json(run.clusters / "summary.json", summary)
        return summary

    return _execute(cfg, "cluster", body, force)


# --- retrieve / select -------------------------------------------------------------------------------------------


def selection_method(cfg: CurateConfig) -> str:
    """The concrete selection method for `select.method` (resolving `auto`)."""
    if cfg.select.method != "auto":
        return cfg.select.method
    if cfg.seeds:
        return "retrieve"
    return "balanced" if cfg.select.n_balanced > 0 else "all"


def retrieve(cfg: CurateConfig, force: bool = False) -> StepResult:
    """Select pool images: retrieval around each seed set, balanced sampling of the hierarchy, or all of them."""
    from curate.cluster import balanced_sample
    from curate.retrieve import retrieve as retrieve_for_seed_set

    def body(run: RunDir, expected: str) -> dict:
        table = derive_status(drop_columns(read_manifest(run.manifest), RETRIEVE_SCHEMA.names))
        pool = np.nonzero(mask_of(table, "pool", ["ok"]))[0]
        n = table.num_rows
        reason: list[str | None] = [None] * n
        score = np.full(n, np.nan, dtype=np.float64)
        method = selection_method(cfg)
        levels = cluster_columns(table)
        uid_col = table.column("uid").to_pylist()
        per_set: dict[str, int] = {}
        if method == "retrieve":
            store = _embedding_store(run, cfg)
            pool_emb = store.gather([uid_col[i] for i in pool]).astype(np.float32)
            level_col = f"{CLUSTER_PREFIX}{cfg.retrieve.cluster_level}"
            assign = (table.column(level_col).to_numpy(zero_copy_only=False) if level_col in table.column_names
                      else None)
            seed_rows = mask_of(table, "seed", ["ok"])
            source_col = np.asarray(table.column("source").to_pylist(), dtype=object)
            for src in cfg.seeds:  # each seed source is a seed set with its own cap
                name = source_name(src)
                seeds = np.nonzero(seed_rows & (source_col == name))[0]
                if seeds.size == 0:
                    log.warning("retrieve: seed set %s has no usable image (all rejected?); it selects nothing", name)
                    continue
                seed_emb = store.gather([uid_col[i] for i in seeds]).astype(np.float32)
                mask, why, sc = retrieve_for_seed_set(
                    pool_emb, seed_emb, [uid_col[i] for i in seeds],
                    assign[pool].astype(np.int64) if assign is not None else None,
                    assign[seeds].astype(np.int64) if assign is not None else None, cfg.retrieve)
                better = mask & ~(np.nan_to_num(score[pool], nan=-np.inf) >= sc)  # ties: the earlier seed set
                for j in np.nonzero(better)[0]:
                    reason[pool[j]], score[pool[j]] = why[j], sc[j]
                per_set[name] = int(mask.sum())
        elif method == "balanced":
            hierarchy = [(np.load(run.clusters / f"level{lv + 1}_centroids.npy"),
                          table.column(col).to_numpy(zero_copy_only=False)[pool].astype(np.int64))
                         for lv, col in enumerate(levels)]
            if not hierarchy:
                raise CurateError("balanced selection needs the cluster step's assignments: run `cluster` first")
            top = hierarchy[-1][1]
            for j in balanced_sample(hierarchy, cfg.select.n_balanced, cfg.select.seed):
                reason[pool[j]] = f"balanced:{len(hierarchy)}/{top[j]}"
        else:
            for i in pool:
                reason[i] = "all"
        decided = mask_of(table, "pool", ["ok", "duplicate", "contaminated"])
        selected = [bool(reason[i] is not None) if decided[i] else None for i in range(n)]
        scores = [None if np.isnan(v) else float(v) for v in score]
        table = derive_status(set_columns(table, {"selected": selected, "selected_by": reason,
                                                  "retrieval_score": scores}, RETRIEVE_SCHEMA))
        write_manifest(table, run.manifest)
        counts = check_accounting(table, final=True)
        summary = {"method": method, "selected": counts["selected"], "not_selected": counts["not_selected"],
                   "per_seed_set": per_set}
        run.retrieval.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.retrieval / "summary.json", summary)
        return summary

    return _execute(cfg, "retrieve", body, force)


# --- shard -------------------------------------------------------------------------------------------------------


def shard(cfg: CurateConfig, partitions: Sequence[int] | None = None, force: bool = False) -> StepResult:
    """Write the selected samples to WebDataset shards (original bytes + JSON metadata) and shards/index.json."""

    def body(run: RunDir, expected: str) -> dict | None:
        run.prepare_output(run.shards, expected, fresh=force)
        table = read_manifest(run.manifest)
        rows = table.filter(pc.equal(table.column("status"), "selected")).to_pylist()
        plan = plan_all_shards(rows, cfg.partitions, cfg.shards.max_count, cfg.shards.max_bytes)
        wanted = set(partitions) if partitions is not None else set(range(cfg.partitions))
        prefix = cfg.shards.prefix
        ours = {number for number, partition, _ in plan if partition in wanted}
        _remove_stale_temporaries(run.shards, rf"{re.escape(prefix)}-(\d+)\.tar", ours)
        _remove_stale_temporaries(run.shards / PARTS_DIR, r"(\d+)\.json", ours)
        written = 0
        with SampleReader() as reader:
            for number, partition, members in tqdm(plan, desc="shard", unit="shard", mininterval=2.0):
                if partition not in wanted or finished_shard(run.shards, prefix, number, partition, len(members)):
                    continue
                writer = ShardWriter(run.shards / shard_name(prefix, number), partition)
                try:
                    for i in members:
                        r = rows[i]
                        data = reader.read(r["file"], r["member"], r["offset"], r["size"])
                        if hashlib.sha256(data).hexdigest() != r["sha256"]:
                            raise OSError(f"{r['file']} {r['member'] or ''}: bytes changed since ingest (sha256 "
                                          "differs); rerun ingest (--force) to refresh the manifest")
                        writer.write(r["uid"], {image_extension(r): data, "json": sample_metadata(r)})
                except BaseException:
                    writer.abort()
                    raise
                record_shard(run.shards, number, writer.close())
                written += 1
        infos = [finished_shard(run.shards, prefix, n, p, len(m)) for n, p, m in plan]
        if any(i is None for i in infos):
            log.info("shard: %d of %d shards still to write; the step completes when all are written",
                     sum(i is None for i in infos), len(infos))
            return None
        write_index(run.shards, infos, {"run": cfg.name, "max_count": cfg.shards.max_count,
                                        "max_bytes": cfg.shards.max_bytes})
        return {"shards": len(infos), "samples": sum(i.count for i in infos), "written_now": written,
                "bytes": sum(i.bytes for i in infos)}

    return _execute(cfg, "shard", body, force)


def _remove_stale_temporaries(folder: Path, shard_file: str, numbers: set[int]) -> None:
    """Remove what killed writers left of the files of shards `numbers`: their temporary siblings, named
    `.<file>.<pid>.tmp` (dinoforge.atomic), where `shard_file` matches <file> and captures the shard number.

    A process id tells nothing across the nodes of an array job, so ownership decides, not liveness: this call
    writes every shard of its partitions that is not finished, so another process's temporary of one of them is
    debris of a killed run, or belongs to a predecessor of this (requeued) task writing the same bytes, whose rename
    then fails while this call writes the shard. Temporaries of other partitions belong to other tasks: left alone.
    """
    pattern = re.compile(rf"\.{shard_file}\.(\d+)\.tmp")
    for path in folder.glob(".*.tmp"):
        match = pattern.fullmatch(path.name)
        if match and int(match[1]) in numbers and int(match[2]) != os.getpid():
            log.info("shard: removing %s, left by an interrupted writer", path)
            path.unlink(missing_ok=True)


# --- report ------------------------------------------------------------------------------------------------------


def report(cfg: CurateConfig, force: bool = False) -> StepResult:
    """report/index.html for whatever has run."""

    def body(run: RunDir, expected: str) -> dict:
        path = write_report(run, cfg.report, cfg.ingest.limits, cfg.dedup.threshold, cfg.dedup.eval_threshold)
        return {"html": str(path.relative_to(run.root)), "bytes": path.stat().st_size}

    return _execute(cfg, "report", body, force)


STEP_FUNCTIONS: dict[str, Callable[..., StepResult]] = {
    "ingest": ingest, "embed": embed, "dedup": dedup, "cluster": cluster, "retrieve": retrieve, "shard": shard,
    "report": report,
}
