"""A profile of one benchmarked training step: torch.profiler over a few steps after warm-up, with named phases.

`PhaseTimer` marks the phases of a step (student, teacher, heads, Sinkhorn-Knopp, losses, backward, optimizer, EMA,
photometric ops) as record_function ranges in the trace and times each with CUDA events (host clocks on a CPU), so
a phase's time is device time even where the autograd engine launches its kernels from another thread.
`profile_step` writes a gzipped chrome trace and returns the tables: phases, the top kernels by device time (the
top operators by self CPU time on a CPU), host-device synchronisations per step, and the device's idle gaps (time
between kernels: launch overhead, syncs, host work the device waits for). `markdown` renders them.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

PHASE_PREFIX = "phase/"
# Host-side events that wait for the device: explicit synchronisation, and the ops that read a device value on the
# host (`.item()`, `int(t)`, `bool(t)` go through _local_scalar_dense; nonzero must learn its output size).
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
               "aten::nonzero", "aten::is_nonzero")
NAME_CHARS = 120  # kernel names are long C++ template instantiations
MIN_GAP_US = 10.0  # shorter idle stretches are a kernel launch's normal latency


class PhaseTimer:
    """Named phases of a step: nothing while inactive; while active, a record_function range and its time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.active = False
        self.records: list[tuple[str, object, object]] = []

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        with record_function(PHASE_PREFIX + name):
            start = self._mark()
            try:
                yield
            finally:
                self.records.append((name, start, self._mark()))

    def wrap(self, owner: object, method: str, name: str) -> None:
        """Time every call of `owner.method` as phase `name` (an instance attribute shadows the class's method)."""
        original = getattr(owner, method)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self(name):
                return original(*args, **kwargs)

        setattr(owner, method, timed)

    def summary(self, steps: int) -> dict[str, dict[str, float]]:
        """Per phase: milliseconds and calls per step (the device must be synchronised first)."""
        total: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        for name, start, end in self.records:
            total[name] += start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3
            calls[name] += 1
        self.records.clear()
        return {name: {"ms_per_step": total[name] / steps, "calls_per_step": calls[name] / steps} for name in total}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."


def _is_annotation(event) -> bool:
    """A record_function range (ours or torch's); kineto mirrors them on the device timeline as well."""
    return (getattr(event, "is_user_annotation", False) or event.name.startswith(PHASE_PREFIX)
            or event.name in ("step", "ProfilerStep"))


def device_events(events) -> list:
    """The device's own events: kernels, copies and memsets, without the mirrored annotations."""
    return [e for e in events if e.device_type == DeviceType.CUDA and not _is_annotation(e)]


def top_kernels(events, on_device: bool, steps: int, n: int = 20) -> tuple[list[dict], float]:
    """The `n` kernels (or CPU operators) with the most self time: ms per step, calls per step, share of the total;
    and that total in ms per step (the device's busy time, or the operators' self CPU time)."""
    time_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    chosen = device_events(events) if on_device else [e for e in events if e.device_type == DeviceType.CPU
                                                        and not _is_annotation(e)]
    for event in chosen:
        time_us[event.name] += event.time_range.elapsed_us() if on_device else event.self_cpu_time_total
        calls[event.name] += 1
    total = sum(time_us.values())
    rows = [{"name": _short(name), "ms_per_step": spent / 1e3 / steps, "calls_per_step": calls[name] / steps,
             "share": spent / total if total else 0.0}
            for name, spent in sorted(time_us.items(), key=lambda item: -item[1])[:n]]
    return rows, total / 1e3 / steps


def idle_gaps(kernels: list[tuple[float, float, str]], steps: int, top: int = 10,
              min_gap_us: float = MIN_GAP_US) -> dict:
    """Device idle time between kernels [(start_us, end_us, name)]: per step, as a share of the profiled span, and
    the longest gaps with the kernels either side (overlapping kernels of several streams count as busy)."""
    if not kernels:
        return {"idle_ms_per_step": None, "idle_share": None, "gaps": []}
    kernels = sorted(kernels)
    gaps = []
    busy_until, last_name = kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start - busy_until >= min_gap_us:
            gaps.append((start - busy_until, last_name, name))
        if end > busy_until:
            busy_until, last_name = end, name
    span = busy_until - kernels[0][0]
    idle = sum(g[0] for g in gaps)
    return {"idle_ms_per_step": idle / 1e3 / steps, "idle_share": idle / span if span > 0 else 0.0,
            "gaps_per_step": len(gaps) / steps,
            "gaps": [{"us": us, "after": _short(before), "before": _short(after)}
                     for us, before, after in sorted(gaps, key=lambda g: -g[0])[:top]]}


def sync_counts(events, steps: int) -> dict[str, float]:
    """Host-device synchronisations per step, by event name (see SYNC_EVENTS)."""
    counts: dict[str, int] = defaultdict(int)
    for event in events:
        if event.name in SYNC_EVENTS:
            counts[event.name] += 1
    return {name: counts[name] / steps for name in SYNC_EVENTS if counts[name]}


def profile_step(step: Callable[[], None], timer: PhaseTimer, device: torch.device, trace: Path | None,
                 steps: int = 3, warmup: int = 1) -> dict:
    """Profile `steps` calls of `step` after `warmup` more; writes `trace` (a gzipped chrome trace) when given."""
    for _ in range(warmup):
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    timer.active = True
    try:
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                with record_function("step"):
                    step()
            _sync(device)
            wall = time.perf_counter() - start
    finally:
        timer.active = False
    events = prof.events()
    on_device = device.type == "cuda"
    kernels, busy_ms = top_kernels(events, on_device, steps)
    intervals = [(e.time_range.start, e.time_range.end, e.name) for e in device_events(events)]
    report = {"steps": steps, "step_ms": wall * 1e3 / steps, "phases": timer.summary(steps),
              "busy_ms_per_step": busy_ms, "busy_is": "device kernels" if on_device else "operators' self CPU time",
              "top_kernels": kernels, "host_syncs_per_step": sync_counts(events, steps),
              "device_idle": idle_gaps(intervals, steps) if on_device else None}
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        plain = trace.with_suffix("")  # x.trace.json.gz -> x.trace.json
        prof.export_chrome_trace(str(plain))
        with plain.open("rb") as source, gzip.open(trace, "wb") as target:
            shutil.copyfileobj(source, target)
        plain.unlink()
        report["trace"] = str(trace)
    return report


def markdown(title: str, report: dict, rows: int = 15) -> str:
    """One profile as Markdown: phases, top kernels, syncs and idle gaps."""
    lines = [f"### {title}", "", f"{report['step_ms']:.1f} ms a step over {report['steps']} profiled steps; busy "
             f"{report['busy_ms_per_step']:.1f} ms ({report['busy_is']}).", "",
             "| phase | ms / step | calls / step |", "|---|---:|---:|"]
    lines += [f"| {name} | {v['ms_per_step']:.2f} | {v['calls_per_step']:g} |" for name, v in report["phases"].items()]
    lines += ["", "| kernel | ms / step | calls / step | share |", "|---|---:|---:|---:|"]
    lines += [f"| `{k['name']}` | {k['ms_per_step']:.2f} | {k['calls_per_step']:g} | {k['share']:.1%} |"
              for k in report["top_kernels"][:rows]]
    syncs = ", ".join(f"{name} {count:g}" for name, count in report["host_syncs_per_step"].items()) or "none"
    what = ("Host-device syncs" if report["device_idle"] is not None else
            "Calls that read tensor values on the host (syncs where the tensor is on a GPU)")
    lines += ["", f"{what} a step: {syncs}."]
    idle = report["device_idle"]
    if idle and idle["idle_ms_per_step"] is not None:
        lines += [f"Device idle {idle['idle_ms_per_step']:.2f} ms a step ({idle['idle_share']:.1%} of the span) in "
                  f"{idle['gaps_per_step']:g} gaps; the longest:", "", "| us | after | before |", "|---:|---|---|"]
        lines += [f"| {g['us']:.0f} | `{g['after']}` | `{g['before']}` |" for g in idle["gaps"]]
    return "\n".join(lines) + "\n"
