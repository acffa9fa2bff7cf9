"""The curation steps, in one registry: each step is a record here and a module beside this one.

A step's module has `run(cfg, context)` (reads its inputs in the run directory, writes its artefacts atomically,
returns a summary) and `config(cfg)` (the config its outputs depend on). Its record says which steps it reads,
whether it runs per partition, and which manifest statuses and columns it decides. The runner
(`curate.steps.runner`) does the rest the same way for every step: it skips a step whose `_SUCCESS.<step>` marker is
current, removes the markers and manifest columns of the steps after one that runs, and writes the marker when the
step completes. Steps recompute their results from their inputs rather than from their own earlier output, so a run
killed at any point and started again ends with the same manifest and shards as an uninterrupted one. Partitioned
steps (a stable hash of the uid) run only `partitions=[...]` when asked, which is how a Slurm array task calls
them; the step's marker is written by whichever call finds every partition done.

Adding a step: a module with `run` and `config`, and a record in STEPS. The CLI (`python -m curate`) and the Slurm
launcher are thin wrappers around `run_step` and `run_all`. Heavy imports (torch, faiss) stay inside the `run`
functions that need them, so importing this registry, and running ingest, loads neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from curate.manifest import CLUSTER_PREFIX, DEDUP_SCHEMA, INGEST_SCHEMA, RETRIEVE_SCHEMA
from curate.steps import cluster, dedup, embed, ingest, report, retrieve, runner, shard
from curate.steps.runner import Step, StepContext, StepOrderError, StepResult

if TYPE_CHECKING:
    from curate.config import CurateConfig

STEPS: tuple[Step, ...] = (
    Step("ingest", ingest.run, ingest.config, statuses=("ok", "rejected"), columns=tuple(INGEST_SCHEMA.names),
         help="read the sources; manifest.parquet with one row per input (rejections with reasons)"),
    Step("embed", embed.run, embed.config, upstream=("ingest",), partitioned=True,
         help="float16 L2-normalised embeddings per partition under embeddings/MODEL/"),
    Step("dedup", dedup.run, dedup.config, upstream=("embed",), partitioned=True,
         statuses=("duplicate", "contaminated"), columns=tuple(DEDUP_SCHEMA.names),
         help="exact (sha256) and near-duplicate (kNN graph) removal, decontamination against eval sets"),
    Step("cluster", cluster.run, cluster.config, upstream=("dedup",), column_prefix=CLUSTER_PREFIX,
         help="hierarchical k-means over the deduplicated pool"),
    Step("retrieve", retrieve.run, retrieve.config, upstream=("cluster",), statuses=("selected", "not_selected"),
         columns=tuple(RETRIEVE_SCHEMA.names),
         help="select images: retrieval around seed sets, balanced sampling, or all"),
    Step("shard", shard.run, shard.config, upstream=("retrieve",), partitioned=True,
         help="WebDataset tars of the selected images + shards/index.json"),
    # the report covers whichever steps have run
    Step("report", report.run, report.config, upstream=("ingest", "embed", "dedup", "cluster", "retrieve", "shard"),
         requires_upstream=False, help="report/index.html (counts, histograms, image grids)"),
)


def step_named(name: str) -> Step:
    """The record of step `name`; ValueError naming the steps when there is none."""
    return runner.step_named(STEPS, name)


def downstream(name: str) -> list[str]:
    """The steps that read step `name`'s outputs, directly or through other steps, in pipeline order."""
    return runner.downstream(STEPS, name)


def run_step(step: str, cfg: CurateConfig, partitions: Sequence[int] | None = None,
             force: bool = False) -> StepResult:
    """Run one step by name; `partitions` (partitioned steps only) runs a subset, as one Slurm array task."""
    return runner.run_step(STEPS, step, cfg, partitions, force)


def run_all(cfg: CurateConfig, force: bool = False) -> list[StepResult]:
    """Every step in order; finished steps are skipped. `force` redoes them all."""
    return runner.run_all(STEPS, cfg, force)


__all__ = ["STEPS", "Step", "StepContext", "StepOrderError", "StepResult", "downstream", "run_all", "run_step",
           "step_named"]
