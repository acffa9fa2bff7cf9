"""The step runner: what a step is, the fingerprint its marker must hold, and running it once.

A step's function does the work (reads its inputs in the run directory, writes its artefacts, returns a summary);
everything around it is here, the same for every step: skip it when its marker is current, remove the markers and
manifest columns of the steps after it, call it, write its marker. The functions take the registry (`steps`) they
run in, so a test can run a toy pipeline through this same code; `curate.steps` binds them to the real one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from curate.errors import CurateError
from curate.manifest import derive_status, drop_columns
from curate.manifest_files import ManifestError, read_schema, rewrite_partitions
from curate.rundir import RunDir, fingerprint
from dinoforge.config import save_config, to_yaml
from dinoforge.run_lock import RunLock

if TYPE_CHECKING:  # curate.config gathers every step's config and with them the steps' heavy imports
    from curate.config import CurateConfig

log = logging.getLogger(__name__)

PERFORMANCE_KEYS = {"batch_size", "num_workers", "device", "chunksize", "use_gpu"}


@dataclass(frozen=True)
class StepContext:
    """Where one call of a step works and what it was asked to do."""

    rundir: RunDir
    fingerprint: str  # what the step's marker will hold; stamps its resumable partial outputs
    partitions: Sequence[int] | None = None  # partitioned steps: the partitions of this call (None: all)
    force: bool = False  # redo from scratch: partial outputs are wiped, not resumed
    steps: tuple[str, ...] = ()  # the names of the pipeline's steps, in order


@dataclass(frozen=True)
class Step:
    """One curation step, as the registry lists it.

    `run(cfg, context)` returns the summary stored in the marker, or None when only some partitions are done.
    `config(cfg)` is the config its outputs depend on (the fingerprint input; speed knobs are left out).
    `requires_upstream=False` runs the step on whichever upstream steps are current (the report).
    `statuses` and `columns` (plus every column named `column_prefix`N) are the manifest's statuses and columns that
    the step decides; when an earlier step runs, the columns of the steps after it are dropped.
    """

    name: str
    run: Callable[[CurateConfig, StepContext], dict | None]
    config: Callable[[CurateConfig], Any]
    upstream: tuple[str, ...] = ()
    partitioned: bool = False
    requires_upstream: bool = True
    statuses: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    column_prefix: str | None = None
    help: str = ""  # one line for `python -m curate --help`

    def owns(self, column: str) -> bool:
        return column in self.columns or (self.column_prefix is not None and column.startswith(self.column_prefix))


@dataclass
class StepResult:
    """What one call of a step did."""

    step: str
    status: str  # "done", "skipped" (marker current) or "partial" (only some partitions ran)
    summary: dict = field(default_factory=dict)


class StepOrderError(CurateError, RuntimeError):
    """A step was asked to run before the steps it reads from."""


def step_named(steps: Sequence[Step], name: str) -> Step:
    for step in steps:
        if step.name == name:
            return step
    raise ValueError(f"unknown step {name!r}; steps: {', '.join(s.name for s in steps)}")


def downstream(steps: Sequence[Step], name: str) -> list[str]:
    """The steps that read `name`'s outputs, directly or through other steps, in pipeline order."""
    after: set[str] = set()
    for other in steps:  # in pipeline order, so one pass sees every step's readers after the step
        if name in other.upstream or after & set(other.upstream):
            after.add(other.name)
    return [s.name for s in steps if s.name in after]


def owning_step(steps: Sequence[Step], column: str) -> str | None:
    """The step that writes manifest column `column` (None: the derived `status` and `reason`)."""
    return next((s.name for s in steps if s.owns(column)), None)


def semantic(config_section: Any) -> Any:
    """`config_section` (a dict tree) without the keys that only change speed."""
    if isinstance(config_section, dict):
        return {k: semantic(v) for k, v in config_section.items() if k not in PERFORMANCE_KEYS}
    if isinstance(config_section, list):
        return [semantic(v) for v in config_section]
    return config_section


def expected_fingerprint(steps: Sequence[Step], rundir: RunDir, name: str, sections: Callable[[str], Any],
                         required: bool = True) -> str:
    """What `name`'s marker must hold to be current: a hash of its config section and of the *current* fingerprints
    of the steps it reads (so a change anywhere upstream changes every step after it).

    `sections(step)` gives the config section of any step. An upstream step that has not run, or whose marker is out
    of date, is a StepOrderError when `required`; otherwise it is left out (the report covers whatever has run).
    """
    upstream = {}
    for up in step_named(steps, name).upstream:
        marker = rundir.read_marker(up)
        current = marker is not None and marker.get("fingerprint") == expected_fingerprint(
            steps, rundir, up, sections, required=required)
        if not current:
            if required:
                state = "has not run" if marker is None else "is out of date (its config or inputs changed)"
                raise StepOrderError(f"step {name!r} needs step {up!r} first, which {state}: run "
                                     f"`python -m curate {up} CONFIG` (or `run` for every step)")
            continue
        upstream[up] = marker.get("output", marker["fingerprint"])
    return fingerprint({"step": name, "config": semantic(sections(name)), "upstream": upstream})


def invalidate_later(steps: Sequence[Step], rundir: RunDir, name: str) -> None:
    """Remove the markers of every step after `name` (it is about to rewrite what they read)."""
    for later in downstream(steps, name):
        if rundir.marker(later).exists():
            log.info("step %s runs: step %s will be redone", name, later)
            rundir.marker(later).unlink(missing_ok=True)


def reset_later_columns(steps: Sequence[Step], rundir: RunDir, name: str) -> None:
    """Drop the manifest columns of the steps after `name` (their markers are gone, they will be redone), so that no
    row keeps a status from a step that is no longer current, such as `not_selected` from an earlier retrieve."""
    try:
        columns = read_schema(rundir.manifest).names
    except ManifestError:  # none yet, or damaged: ingest rebuilds it, other steps report it
        return
    later = [c for c in columns if owning_step(steps, c) in downstream(steps, name)]
    if later:
        log.info("step %s runs: clearing the manifest columns of later steps (%s)", name, ", ".join(later))
        rewrite_partitions(rundir.manifest, lambda part, _: derive_status(drop_columns(part, later)))


def save_run_config(cfg: CurateConfig) -> None:
    """config.yaml of the run, rewritten only when it changed: a finished run on a read-only disk reruns as a no-op."""
    path = cfg.run_dir / "config.yaml"
    if not path.is_file() or path.read_text() != to_yaml(cfg):
        save_config(cfg, cfg.run_dir)


def execute(steps: Sequence[Step], name: str, cfg: CurateConfig, partitions: Sequence[int] | None = None,
            force: bool = False) -> StepResult:
    """Run step `name` unless its marker is current; write its marker when it completes."""
    step = step_named(steps, name)
    rundir = RunDir(cfg.run_dir)

    def sections(other: str) -> Any:
        return step_named(steps, other).config(cfg)

    expected = expected_fingerprint(steps, rundir, name, sections, required=step.requires_upstream)
    if force:
        rundir.marker(name).unlink(missing_ok=True)
    elif rundir.is_done(name, expected):
        log.info("step %s: complete (%s), skipping", name, rundir.marker(name))
        return StepResult(name, "skipped", (rundir.read_marker(name) or {}).get("summary", {}))
    started = time.time()
    log.info("step %s: starting in %s", name, rundir.root)
    invalidate_later(steps, rundir, name)
    reset_later_columns(steps, rundir, name)
    summary = step.run(cfg, StepContext(rundir, expected, partitions, force, tuple(s.name for s in steps)))
    if summary is None:
        return StepResult(name, "partial")
    rundir.write_marker(name, expected, summary, started)
    log.info("step %s: done in %.1fs: %s", name, time.time() - started, summary)
    return StepResult(name, "done", summary)


def run_step(steps: Sequence[Step], name: str, cfg: CurateConfig, partitions: Sequence[int] | None = None,
             force: bool = False) -> StepResult:
    """Run one step by name; `partitions` (partitioned steps only) runs a subset, as one Slurm array task."""
    step = step_named(steps, name)
    if partitions is not None and not step.partitioned:
        partitioned = ", ".join(s.name for s in steps if s.partitioned)
        raise ValueError(f"step {name!r} does not run per partition (only {partitioned} do)")
    if partitions is not None and force:
        raise ValueError("force with partitions would discard the partitions other tasks finished; force the whole "
                         "step once (no partitions) instead")
    # a whole step locks the run folder; a Slurm array task (partitions) shares it with its step's other tasks
    with RunLock(cfg.run_dir) if partitions is None else contextlib.nullcontext():
        save_run_config(cfg)
        return execute(steps, name, cfg, partitions, force)


def run_all(steps: Sequence[Step], cfg: CurateConfig, force: bool = False) -> list[StepResult]:
    """Every step in order; finished steps are skipped. `force` redoes them all."""
    with RunLock(cfg.run_dir):  # a second `curate run` on this folder refuses, naming this process
        save_run_config(cfg)
        return [execute(steps, step.name, cfg, force=force) for step in steps]
