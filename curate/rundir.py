"""The run directory of a curation run, and the completion markers that make every step restartable.

A marker `_SUCCESS.<step>` is written last by a step and holds a fingerprint of what the step's output depends on:
its own config section and the `output` ids of the steps it read. The `output` id hashes the fingerprint and the
step's summary, which for ingest includes a digest of every row's uid and sha256: re-ingesting files whose bytes
changed gives a new id, so everything after it is redone. A step whose marker matches is skipped; one whose marker
does not match (its config, or an upstream result, changed) is redone, and a step that runs removes the markers
of the steps after it, which rebuild their manifest columns. Non-semantic knobs (batch size, workers, device) are
left out of the fingerprints, so changing them redoes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from dinoforge.atomic import atomic_write_json

log = logging.getLogger(__name__)

STEPS = ("ingest", "embed", "dedup", "cluster", "retrieve", "shard", "report")
# Steps whose outputs each step reads.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "embed": ("ingest",),
    "dedup": ("embed",),
    "cluster": ("dedup",),
    "retrieve": ("cluster",),
    "shard": ("retrieve",),
    "report": ("ingest", "embed", "dedup", "cluster", "retrieve", "shard"),  # whichever have run
}
PERFORMANCE_KEYS = {"batch_size", "num_workers", "device", "chunksize", "use_gpu"}


def downstream(step: str) -> list[str]:
    """The steps that read `step`'s outputs, directly or through other steps, in pipeline order."""
    after: set[str] = set()
    for other in STEPS:  # STEPS is in pipeline order, so one pass sees every step's readers after the step
        if step in UPSTREAM[other] or after & set(UPSTREAM[other]):
            after.add(other)
    return [s for s in STEPS if s in after]


class StepOrderError(CurateError, RuntimeError):
    """A step was asked to run before the steps it reads from."""


def fingerprint(payload: Any) -> str:
    """Short sha256 of a JSON-serialisable payload (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def semantic(config_section: Any) -> Any:
    """`config_section` (a dict tree) without the keys that only change speed."""
    if isinstance(config_section, dict):
        return {k: semantic(v) for k, v in config_section.items() if k not in PERFORMANCE_KEYS}
    if isinstance(config_section, list):
        return [semantic(v) for v in config_section]
    return config_section


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

    def expected_fingerprint(self, step: str, sections: Callable[[str], Any], required: bool = True) -> str:
        """What `step`'s marker must hold to be current: a hash of its config section and of the *current*
        fingerprints of the steps it reads (so a change anywhere upstream changes every step after it).

        `sections(step)` gives the config section of any step. An upstream step that has not run, or whose marker
        is out of date, is a StepOrderError when `required`; otherwise it is left out (the report covers whatever
        has run).
        """
        upstream = {}
        for up in UPSTREAM[step]:
            marker = self.read_marker(up)
            current = marker is not None and marker.get("fingerprint") == self.expected_fingerprint(
                up, sections, required=required)
            if not current:
                if required:
                    state = "has not run" if marker is None else "is out of date (its config or inputs changed)"
                    raise StepOrderError(f"step {step!r} needs step {up!r} first, which {state}: run "
                                         f"`python -m curate {up} CONFIG` (or `run` for every step)")
                continue
            upstream[up] = marker.get("output", marker["fingerprint"])
        return fingerprint({"step": step, "config": semantic(sections(step)), "upstream": upstream})

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
        """Mark `step` complete (atomic write, last action of the step)."""
        doc = {"step": step, "fingerprint": expected, "output": fingerprint({"fingerprint": expected,
                                                                            "summary": summary}),
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": round(time.time() - started, 3),
               "summary": summary}
        return atomic_write_json(self.marker(step), doc)

    def invalidate_downstream(self, step: str) -> None:
        """Remove the markers of every step after `step` (it is about to rewrite what they read)."""
        for later in downstream(step):
            if self.marker(later).exists():
                log.info("step %s runs: step %s will be redone", step, later)
                self.marker(later).unlink(missing_ok=True)

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
