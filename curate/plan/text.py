"""The plan as text: one row per step, totals, then where every figure comes from (measured here, computed, stated,
assumed) and what will not fit."""

from __future__ import annotations

from curate.plan.gpu_speeds import NETWORK_EFFICIENCY, SCAN_EFFICIENCY, SGEMM_EFFICIENCY
from curate.plan.model import PlanRequest, Rates, StepPlan

COLUMNS = ("step", "array shape", "images", "GPU FLOPs", "read", "per task", "step time", "host mem/task",
           "GPU mem/task", "disk")


def si(value: float, unit: str = "") -> str:
    """3 significant digits with an SI prefix: 1.2e12 B -> '1.20 TB'; 0 -> '-'."""
    if value <= 0:
        return "-"
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}".rstrip()
    return f"{value:.3g} {unit}".rstrip()


def duration(seconds: float) -> str:
    """Seconds as s, min, h or days, 2-3 significant digits."""
    if seconds <= 0:
        return "-"
    for scale, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.2g} s"


def count(value: float) -> str:
    """An image count: 7,854 or 1.42e8."""
    if value < 1e6:
        return f"{value:,.0f}"
    exponent = int(f"{value:e}".split("e")[1])
    return f"{value / 10**exponent:.3g}e{exponent}"


def flops(value: float) -> str:
    return f"{value:.2e}" if value > 0 else "-"


def render(plans: list[StepPlan], request: PlanRequest, rates: Rates, config: str) -> str:
    gpu = request.gpu
    lines = [f"Curation plan for {config}: {request.images:,} images on {request.gpus} x {gpu.name} "
             f"({request.cpus_per_gpu} CPU cores beside each GPU)", ""]
    rows = [COLUMNS]
    for p in plans:
        rows.append((p.step, p.shape.describe(), count(p.images), flops(p.gpu_flops), si(p.read_bytes, "B"),
                     duration(p.task_s), duration(p.wall_s), si(p.host_bytes, "B"), si(p.gpu_bytes, "B"),
                     si(p.disk_bytes, "B")))
    total = sum(p.wall_s for p in plans)
    gpu_hours = sum(p.shape.tasks * p.task_s + p.shape.closing * p.closing_s for p in plans) / 3600
    rows.append(("total", "steps in sequence", "", flops(sum(p.gpu_flops for p in plans)), "", "",
                 duration(total), "", "", si(sum(p.disk_bytes for p in plans), "B")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    lines.append(f"GPU-hours in tasks: {gpu_hours:,.0f} of the {request.gpus * total / 3600:,.0f} that "
                 f"{request.gpus} GPUs give in {duration(total)}")
    lines += ["", "How each step is timed:"]
    lines += [f"  {p.step:9s}{'; '.join(p.basis)}" for p in plans]
    lines += ["", *warnings(plans, request), "", "Where the figures come from:"]
    machines: dict[str, list[str]] = {}
    for name in sorted(rates.costs):
        machines.setdefault(rates.costs[name].measured_on.describe(), []).append(name)
    for machine, names in machines.items():
        lines.append(f"  measured ({rates.record}) on {machine}:")
        for name in names:
            c = rates.costs[name]
            lines.append(f"    {name} = {c.value:.4g} {c.unit}  ({c.measured_on.date}: {c.command})")
    lines.append(f"  stated (datasheet): {gpu.name}: {gpu.fp32_tflops:g} fp32 / {gpu.bf16_tflops:g} bf16 TFLOPs, "
                 f"{gpu.bandwidth_tbs:g} TB/s, {gpu.memory_gb:g} GB" + (f"; {gpu.note}" if gpu.note else ""))
    lines.append(f"  assumed: {NETWORK_EFFICIENCY:.0%} of the bf16 peak for the network, {SGEMM_EFFICIENCY:.0%} "
                 f"of the fp32 peak for faiss sgemm, {SCAN_EFFICIENCY:.0%} of the bandwidth for list scans; no "
                 "duplicates (work after dedup is the pool's); evaluation sets small beside the pool")
    if not request.image_bytes:
        lines.append("  image size: the record's measured mean of the bench images (--image-bytes for your pool's)")
    lines.append("  computed: FLOPs per image from the network's architecture, index and k-means work from the "
                 "config (curate.knn.index, curate.selection.cluster), array shapes from the Slurm launcher's plan "
                 "(curate.jobs)")
    return "\n".join(lines)


def warnings(plans: list[StepPlan], request: PlanRequest) -> list[str]:
    """What will not fit or will leave GPUs idle, one line each."""
    out = []
    for p in plans:
        if p.gpu_bytes > request.gpu.memory_gb * 1e9:
            out.append(f"does not fit: {p.step} needs {si(p.gpu_bytes, 'B')} of GPU memory per task, a "
                       f"{request.gpu.name} has {request.gpu.memory_gb:g} GB")
        if p.host_bytes > request.host_gb * 1e9:
            out.append(f"does not fit: {p.step} needs {si(p.host_bytes, 'B')} of host memory per task, more than "
                       f"--host-gb {request.host_gb:g}")
    partitioned = [p for p in plans if p.shape.closing]
    if partitioned and partitioned[0].shape.tasks < request.gpus:
        tasks = partitioned[0].shape.tasks
        out.append(f"idle GPUs: {tasks} partitions keep {tasks} of {request.gpus} GPUs busy in "
                   f"{', '.join(p.step for p in partitioned)}; set partitions={request.gpus} or a multiple")
    single = [p.step for p in plans if p.shape.tasks == 1 and p.wall_s > 0.5 * sum(q.wall_s for q in plans)]
    if single:
        out.append(f"one task: {', '.join(single)} runs as a single task and takes most of the time")
    return out or ["Everything fits, and every GPU has a task in the partitioned steps."]
