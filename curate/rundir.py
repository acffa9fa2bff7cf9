"""The run directory of a curation run, and the completion markers that make every step restartable.

A marker `_SUCCESS.<step>` is written last by a step and holds a fingerprint of what the step's output depends on:
its own config section and the `output` ids of the steps it read. The `output` id hashes the fingerprint and the
step's summary (less its `this_call` timings and counts), which for ingest includes a digest of every row's uid and
sha256: re-ingesting files whose bytes
changed gives a new id, so everything after it is redone. A step whose marker matches is skipped; one whose marker
does not match (its config, or an upstream result, changed) is redone, and a step that runs removes the markers
of the steps after it, which rebuild their manifest columns. Non-semantic knobs (batch size, workers, device) are
left out of the fingerprints, so changing them redoes nothing.

This module knows files, not steps: which steps read which is the registry's (`curate.steps`), and the runner
(`curate.steps.runner`) computes the fingerprints and invalidates the steps after the one that runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dinoforge.atomic import atomic_write_json

log = logging.getLogger(__name__)

# The summary key of facts about the call that completed a step rather than about its output (see `output_id`).
THIS_CALL = "this_call"


def fingerprint(payload: Any) -> str:
    """Short sha256 of a JSON-serialisable payload (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_id(expected: str, summary: dict) -> str:
    """The id of a step's output: its fingerprint and its summary, less the summary's `THIS_CALL` part.

    That part says how the last call ran (images embedded by it, images per second): an interrupted and resumed
    run produces the same artefacts as an uninterrupted one, so it must give the steps after it the same ids.
    """
    return fingerprint({"fingerprint": expected, "summary": {k: v for k, v in summary.items() if k != THIS_CALL}})


class RunDir:
    """Paths and markers of `runs/curate/NAME/`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    def embeddings(self, model: str) -> Path:
        return self.root / "embeddings" / model

    @property
    def dedup(self) -> Path:
        return self.root / "dedup"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def retrieval(self) -> Path:
        return self.root / "retrieval"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def marker(self, step: str) -> Path:
        return self.root / f"_SUCCESS.{step}"

    def read_marker(self, step: str) -> dict | None:
        path = self.marker(step)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # a marker is written atomically, so this is a foreign file: treat the step as not done

    def is_done(self, step: str, expected: str) -> bool:
        """True when the marker exists and matches; logs why a stale marker is being ignored."""
        marker = self.read_marker(step)
        if marker is None:
            return False
        if marker.get("fingerprint") == expected:
            return True
        log.warning("step %s finished earlier with a different config or different inputs; redoing it", step)
        self.marker(step).unlink(missing_ok=True)
        return False

    def write_marker(self, step: str, expected: str, summary: dict, started: float) -> Path:
        """Mark `step` complete (atomic write, last action of the step); `output_id` names what it produced."""
        doc = {"step": step, "fingerprint": expected, "output": output_id(expected, summary),
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": round(time.time() - started, 3),
               "summary": summary}
        return atomic_write_json(self.marker(step), doc)

    def prepare_output(self, folder: Path, expected: str, fresh: bool = False) -> None:
        """Create `folder` for a step's outputs; partial outputs of an older fingerprint (or any, when `fresh`: a
        forced step) are wiped first.

        Partition files of an interrupted run are kept when the fingerprint matches, which is what lets a rerun
        (or a requeued Slurm array task) continue where it stopped.
        """
        stamp = folder / "_FINGERPRINT"
        if folder.exists():
            if not fresh and stamp.is_file() and stamp.read_text().strip() == expected:
                return
            log.info("removing outdated partial outputs in %s", folder)
            shutil.rmtree(folder)
        # Build the stamped folder aside and rename it in, so a concurrent array task never sees it unstamped.
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / stamp.name).write_text(expected + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another task created it first
            shutil.rmtree(tmp, ignore_errors=True)
