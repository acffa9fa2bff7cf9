"""The report step: report/index.html (counts, histograms, image grids) for whichever steps have run."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from curate.report.writer import write_report
from curate.rundir import THIS_CALL

if TYPE_CHECKING:
    from curate.config import CurateConfig
    from curate.steps.runner import StepContext


def config(cfg: CurateConfig) -> dict:
    return {"report": dataclasses.asdict(cfg.report), "thresholds": [cfg.dedup.threshold, cfg.dedup.eval_threshold]}


def run(cfg: CurateConfig, context: StepContext) -> dict:
    """Render the report of whatever has run."""
    rundir = context.rundir
    path = write_report(rundir, cfg.report, cfg.ingest.limits, cfg.dedup.threshold, cfg.dedup.eval_threshold,
                        steps=context.steps)
    # The page shows when and how fast each step ran, so its size belongs to this call, not to the output's id.
    return {"html": str(path.relative_to(rundir.root)), THIS_CALL: {"bytes": path.stat().st_size}}
