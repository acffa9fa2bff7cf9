"""The ingest step: read every source (pool, seeds, evals) into manifest.parquet, one row per input.

It needs neither torch nor faiss: it runs on CPU-only array tasks and must start fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING

from curate.manifest import check_accounting, mask_of, write_manifest
from curate.sources.ingest import ingest_sources

if TYPE_CHECKING:
    from curate.config import CurateConfig
    from curate.steps.runner import StepContext


def config(cfg: CurateConfig) -> dict:
    asdict = dataclasses.asdict
    return {"sources": [asdict(s) for s in cfg.sources], "seeds": [asdict(s) for s in cfg.seeds],
            "evals": [asdict(s) for s in cfg.evals], "ingest": asdict(cfg.ingest), "partitions": cfg.partitions}


def run(cfg: CurateConfig, context: StepContext) -> dict:
    """Read every source; write manifest.parquet with one row per input."""
    role_sources = ([("pool", s) for s in cfg.sources] + [("seed", s) for s in cfg.seeds]
                    + [("eval", s) for s in cfg.evals])
    table = ingest_sources(role_sources, cfg.ingest, cfg.partitions)
    write_manifest(table, context.rundir.manifest)
    counts = check_accounting(table)
    content = hashlib.sha256()
    for uid, sha in zip(table.column("uid").to_pylist(), table.column("sha256").to_pylist(), strict=True):
        content.update(f"{uid} {sha}\n".encode())
    return {"inputs": table.num_rows, "pool_ok": counts["ok"], "pool_rejected": counts["rejected"],
            **{f"{role}_rows": int(mask_of(table, role).sum()) for role in ("seed", "eval")},
            "content_sha256": content.hexdigest()}
