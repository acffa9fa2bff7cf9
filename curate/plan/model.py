"""`python -m curate plan`: what a curation run of N images would cost on G GPUs of a kind, step by step, before
anything is spent.

Each step's work (images, GPU FLOPs, bytes) follows from the config and the code's own choices (the index plan of
`curate.knn.index.plan_index`, the k-means sample sizes of `curate.selection.cluster`, the network's FLOPs per image
from its architecture); its time comes from per-item CPU costs measured on a machine by the benches
(`curate.plan.costs`) and stated GPU speeds (`curate.plan.gpu_speeds`); its array shape is what
`curate.jobs.plan_jobs` (the Slurm launcher's planning) would submit: one task per partition for partitioned steps,
each task holding one GPU, at most G at once.

The model is the code as it is, not as it could be: every task of a step reads the whole manifest, every dedup task
builds the whole pool's index, clustering holds every embedding. Assumed: no duplicates (an upper bound on the work
after dedup), evaluation sets small beside the pool (decontamination not counted), decoding overlapped with the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from curate.config import CurateConfig
from curate.embedding.config import EmbedConfig
from curate.knn.index import RERANK_FACTOR, TRAIN_ITERATIONS, plan_index
from curate.plan.costs import Cost, require
from curate.plan.gpu_speeds import NETWORK_EFFICIENCY, SCAN_EFFICIENCY, SGEMM_EFFICIENCY, GpuSpeed
from curate.plan.network_cost import copydetect_dim, network_cost
from curate.steps import STEPS


@dataclass(frozen=True)
class PlanRequest:
    """What the plan is for: `images` in the pool, `gpus` of `gpu` speed, `cpus_per_gpu` cores and `host_gb` of
    memory beside each."""

    images: int
    gpus: int
    gpu: GpuSpeed
    cpus_per_gpu: int = 10
    host_gb: float = 480.0  # host memory one task may use
    seeds: int = 0  # seed images for retrieval (0: none)
    image_bytes: float = 0.0  # mean encoded image size; 0: the record's measured mean

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ValueError(f"--images {self.images}: give the pool size as a positive count, e.g. --images 1e9")
        if self.gpus < 1:
            raise ValueError(f"--gpus {self.gpus}: give the number of GPUs as a positive count, e.g. --gpus 64")
        if self.cpus_per_gpu < 1 or self.host_gb <= 0:
            raise ValueError(f"--cpus-per-gpu {self.cpus_per_gpu} and --host-gb {self.host_gb:g}: must be >= 1")
        if self.seeds < 0 or self.image_bytes < 0:
            raise ValueError("--seeds and --image-bytes must be >= 0")


@dataclass(frozen=True)
class ArrayShape:
    """What the launcher submits for a step: an array of `tasks` (`at_once` running together), then `closing`."""

    tasks: int
    closing: int
    at_once: int

    @property
    def waves(self) -> int:
        return math.ceil(self.tasks / self.at_once)

    def describe(self) -> str:
        if self.tasks == 1:
            return "1 task"
        text = f"array of {self.tasks} ({self.at_once} at once, {self.waves} wave{'s' * (self.waves > 1)})"
        return text + (f" + {self.closing} closing" if self.closing else "")


@dataclass
class StepPlan:
    """One step's work, resources and time. Per task: `task_s`, `host_bytes`, `gpu_bytes`; totals otherwise."""

    step: str
    shape: ArrayShape
    images: int = 0
    gpu_flops: float = 0.0  # compute-bound GPU work (network forward, sgemm)
    scan_bytes: float = 0.0  # memory-bound GPU work (IVF list scans)
    cpu_core_s: float = 0.0  # CPU work, in core-seconds
    read_bytes: float = 0.0  # read from storage (images, embeddings)
    disk_bytes: float = 0.0  # written and kept
    task_s: float = 0.0
    closing_s: float = 0.0
    host_bytes: float = 0.0
    gpu_bytes: float = 0.0
    basis: list[str] = field(default_factory=list)  # where the time comes from: measured / computed / stated

    @property
    def wall_s(self) -> float:
        return self.shape.waves * self.task_s + self.shape.closing * self.closing_s


@dataclass(frozen=True)
class Rates:
    """The speeds the plan times work with: measured CPU costs and a stated GPU."""

    costs: dict[str, Cost]
    gpu: GpuSpeed
    cores: int  # CPU cores beside each GPU
    record: Path

    def cost(self, name: str) -> float:
        return require(self.costs, name, self.record).value

    def gpu_s(self, flops: float, scan_bytes: float = 0.0, network: bool = False) -> float:
        peak = (self.gpu.bf16_tflops * NETWORK_EFFICIENCY if network else self.gpu.fp32_tflops * SGEMM_EFFICIENCY)
        return flops / (peak * 1e12) + scan_bytes / (self.gpu.bandwidth_tbs * 1e12 * SCAN_EFFICIENCY)


def plan_curation(cfg: CurateConfig, request: PlanRequest, rates: Rates,
                  shapes: Callable[[str], tuple[int, int]]) -> list[StepPlan]:
    """The plan of every step of `cfg` for `request`; `shapes(step)` gives (array tasks, closing tasks) as the
    launcher would submit the step (`array_shape` below)."""
    n = request.images
    image_bytes = request.image_bytes or rates.cost("image_bytes_mean")
    manifest_s = n * rates.cost("manifest_read_cpu_s_per_row") / rates.cores  # every task reads it whole
    manifest_mem = n * rates.cost("manifest_memory_bytes_per_row")

    def shape(step: str) -> ArrayShape:
        tasks, closing = shapes(step)
        return ArrayShape(tasks, closing, min(tasks, request.gpus))

    selected = selected_images(cfg, n, request.seeds)
    plans = [
        _ingest(cfg, n, image_bytes, rates, shape("ingest")),
        _embed(cfg, n, image_bytes, rates, shape("embed"), manifest_s, manifest_mem),
        _dedup(cfg, n, rates, shape("dedup"), manifest_s, manifest_mem),
        _cluster(cfg, n, rates, shape("cluster"), manifest_s, manifest_mem),
        _retrieve(cfg, n, request.seeds, selected, rates, shape("retrieve"), manifest_s, manifest_mem),
        _shard(selected, image_bytes, rates, shape("shard"), manifest_s, manifest_mem),
        _report(n, shape("report"), manifest_s, manifest_mem),
    ]
    planned, registered = [p.step for p in plans], [s.name for s in STEPS]
    if planned != registered:  # a new step must get a cost model before the plan claims to cover a run
        raise RuntimeError(f"the plan models steps {planned}, the registry has {registered}")
    for p in plans:
        p.closing_s = manifest_s  # a closing task reads the manifest, finds every partition done, marks the step
    return plans


def array_shape(config: str, overrides: list[str], step: str) -> tuple[int, int]:
    """(array tasks, closing tasks) of `step` as the Slurm launcher plans it (`curate.jobs.plan_jobs`)."""
    from curate.jobs import plan_jobs

    _, specs = plan_jobs([step, config, *overrides])
    return len(specs[0].argvs), len(specs) - 1


def selected_images(cfg: CurateConfig, n: int, seeds: int) -> int:
    """How many pool images the selection keeps (the shards' size): retrieval's seeds x neighbours or cap,
    balanced's n_balanced, or all."""
    from curate.selection.retrieve import resolve_mode
    from curate.steps.retrieve import selection_method

    method = selection_method(cfg)
    if method == "retrieve":
        if seeds < 1:
            raise ValueError("this config retrieves around seed sets: give their image count with --seeds N "
                             "(e.g. --seeds 1e6)")
        per_set = (seeds * cfg.retrieve.n_per_seed if resolve_mode(cfg.retrieve, seeds, True) == "sample"
                   else cfg.retrieve.cap_per_seed_set)
        return min(n, per_set, cfg.retrieve.cap_per_seed_set * max(1, len(cfg.seeds)))
    if method == "balanced":
        return min(n, cfg.select.n_balanced)
    return n


def _ingest(cfg: CurateConfig, n: int, image_bytes: float, rates: Rates, shape: ArrayShape) -> StepPlan:
    cpu = n * rates.cost("ingest_cpu_s_per_image")
    workers = min(max(1, cfg.ingest.num_workers), rates.cores)  # ingest.num_workers probing processes
    return StepPlan("ingest", shape, images=n, cpu_core_s=cpu, read_bytes=n * image_bytes,
                    disk_bytes=n * rates.cost("manifest_disk_bytes_per_row"), task_s=cpu / workers,
                    host_bytes=n * rates.cost("manifest_memory_bytes_per_row"),
                    basis=[f"hash + probe measured per image, on {workers} core(s) (ingest.num_workers="
                           f"{cfg.ingest.num_workers})"])


def _embedders(cfg: CurateConfig) -> list[EmbedConfig]:
    """The embeddings the embed step computes: the run's, and the dedup one when it is another."""
    if cfg.dedup_embed is None or cfg.dedup_embed == cfg.embed:
        return [cfg.embed]
    return [cfg.embed, cfg.dedup_embed]


def embedding_dim(embed: EmbedConfig) -> int:
    cost = network_cost(embed)
    return copydetect_dim() if cost is None else cost.dim


def _embed(cfg: CurateConfig, n: int, image_bytes: float, rates: Rates, shape: ArrayShape, manifest_s: float,
           manifest_mem: float) -> StepPlan:
    per_task = math.ceil(n / shape.tasks)
    plan = StepPlan("embed", shape, images=n, host_bytes=manifest_mem)
    task_s = 0.0
    for embed in _embedders(cfg):
        plan.read_bytes += n * image_bytes  # each embedding reads the partition's images again
        cost = network_cost(embed)
        if cost is None:  # the descriptor: decode + descriptor on the CPU cores, measured together
            cpu = n * rates.cost("copydetect_cpu_s_per_image")
            plan.cpu_core_s += cpu
            task_s += per_task * rates.cost("copydetect_cpu_s_per_image") / rates.cores
            plan.basis.append("copydetect (decode + descriptor) measured per image on CPU, timed on the task's "
                              f"{rates.cores} cores")
            dim = copydetect_dim()
        else:
            flops = n * cost.flops_per_image
            plan.gpu_flops += flops
            plan.cpu_core_s += n * rates.cost("decode_cpu_s_per_image")
            decode_s = per_task * rates.cost("decode_cpu_s_per_image") / rates.cores
            forward_s = rates.gpu_s(per_task * cost.flops_per_image, network=True)
            task_s += max(decode_s, forward_s)  # decoding threads feed the GPU while it computes
            plan.gpu_bytes = max(plan.gpu_bytes, 4.0 * cost.params)  # fp32 weights (activations not counted)
            plan.basis.append(f"{cost.name}: {cost.flops_per_image / 1e9:.1f} GFLOPs/image computed from the "
                              f"architecture at {NETWORK_EFFICIENCY:.0%} of the stated bf16 peak; decoding measured "
                              f"per image on {rates.cores} cores ({'GPU' if forward_s >= decode_s else 'decoding'} "
                              "bound)")
            dim = cost.dim
        plan.disk_bytes += 2.0 * n * dim  # float16
        plan.host_bytes += 2.0 * per_task * dim  # the partition's embeddings before they are written
    plan.task_s = manifest_s + task_s
    return plan


def _index_work(cfg: CurateConfig, rows: int, dim: int, queries: float, k: int) -> tuple[float, float, float, str]:
    """(sgemm FLOPs of building, sgemm FLOPs of searching `queries`, bytes scanned, description) of an index of
    `rows` x `dim` as `curate.knn.index` plans it."""
    plan = plan_index(cfg.index, rows, dim)
    if plan.kind == "flat":
        return 0.0, 2.0 * queries * rows * dim, 0.0, "flat (exact)"
    train = 2.0 * TRAIN_ITERATIONS * plan.train_rows * plan.nlist * dim  # spherical k-means of the cells
    add = 2.0 * rows * plan.nlist * dim  # every row to its nearest cell
    coarse = 2.0 * queries * plan.nlist * dim
    code = plan.pq_m if plan.kind == "ivfpq" else 2 * dim  # ivf stores the store's float16 rows as float16
    scanned = queries * plan.nprobe * (rows / plan.nlist) * code
    if plan.kind == "ivfpq":  # candidates re-ranked with their float16 vectors, read from the store
        scanned += queries * RERANK_FACTOR * k * 2 * dim
    what = f"{plan.kind} (nlist {plan.nlist}, nprobe {plan.nprobe}{f', {plan.pq_m} B codes' * bool(plan.pq_m)})"
    return train + add, coarse, scanned, what


def index_bytes(cfg: CurateConfig, rows: int, dim: int) -> float:
    """Peak memory of the index `curate.knn.index` builds over `rows` x `dim` of the store's float16 embeddings, one
    partition's rows at a time (`ShardedIndex`): its centroids, and the larger of the float32 sample IVF trains on
    (freed before rows are added) and one partition's rows (vectors or codes, and ids)."""
    plan = plan_index(cfg.index, rows, dim, fp16=True)
    held = math.ceil(rows / cfg.partitions)
    if plan.kind == "flat":
        return 4.0 * held * dim
    code = plan.pq_m if plan.kind == "ivfpq" else 2 * dim
    return 4.0 * plan.nlist * dim + max(held * (code + 8.0), 4.0 * plan.train_rows * dim)


def _dedup(cfg: CurateConfig, n: int, rates: Rates, shape: ArrayShape, manifest_s: float,
           manifest_mem: float) -> StepPlan:
    dim = embedding_dim(cfg.dedup_embed or cfg.embed)
    per_task = math.ceil(n / shape.tasks)
    build, search, scanned, what = _index_work(cfg, n, dim, per_task, cfg.dedup.k + 1)
    # every task reads every row's embedding from the store's memory maps, a chunk at a time, into an index of one
    # partition at a time, and searches its own partition against each: its memory is one partition's index (the
    # maps are page cache)
    task_gpu = rates.gpu_s(build + search, scanned)
    return StepPlan("dedup", shape, images=n, gpu_flops=shape.tasks * (build + search),
                    scan_bytes=shape.tasks * scanned, read_bytes=shape.tasks * 2.0 * n * dim,
                    task_s=manifest_s + task_gpu, host_bytes=manifest_mem + index_bytes(cfg, n, dim),
                    gpu_bytes=index_bytes(cfg, n, dim),
                    basis=[f"kNN graph (k={cfg.dedup.k}) through {what}, index built by every task: FLOPs and "
                           f"scanned bytes from curate.knn.index's plan, at {SGEMM_EFFICIENCY:.0%} of the stated fp32 "
                           f"peak and {SCAN_EFFICIENCY:.0%} of the stated bandwidth"])


def _kmeans_flops(points: float, k: int, dim: int, n_iter: int, n_redo: int, mppc: int) -> float:
    """sgemm FLOPs of one `spherical_kmeans`: training on at most k * mppc points, then assigning all."""
    return 2.0 * dim * k * (n_redo * n_iter * min(points, k * mppc) + points)


def _cluster(cfg: CurateConfig, n: int, rates: Rates, shape: ArrayShape, manifest_s: float,
             manifest_mem: float) -> StepPlan:
    c, dim = cfg.cluster, embedding_dim(cfg.embed)
    flops, inputs = 0.0, float(n)
    for level, k in enumerate(c.n_clusters):
        k = int(min(k, inputs))
        flops += _kmeans_flops(inputs, k, dim, c.n_iter, c.n_redo, c.max_points_per_centroid)
        if c.sample_size[level] > 1:  # resampling: k-means on a balanced sample, then every input re-assigned
            sample = min(inputs, c.sample_size[level] * k)
            flops += c.resampling_steps[level] * (_kmeans_flops(sample, k, dim, c.n_iter, c.n_redo,
                                                                c.max_points_per_centroid) + 2.0 * dim * k * inputs)
        inputs = float(k)  # the next level clusters this level's centroids
    train = min(n, c.n_clusters[0] * c.max_points_per_centroid)
    # Host: the float32 training sample (the pool is read from the store's memory maps and assigned a chunk at a
    # time); faiss pages host data through the GPU, which holds the centroids. The assignments are manifest columns,
    # the centroids files.
    return StepPlan("cluster", shape, images=n, gpu_flops=flops, read_bytes=2.0 * n * dim,
                    disk_bytes=4.0 * dim * sum(c.n_clusters), task_s=manifest_s + rates.gpu_s(flops),
                    host_bytes=manifest_mem + 4.0 * dim * train, gpu_bytes=4.0 * dim * c.n_clusters[0],
                    basis=[f"hierarchical k-means {c.n_clusters} ({c.n_iter} iterations, resampling "
                           f"{c.resampling_steps}): FLOPs from the sample sizes at {SGEMM_EFFICIENCY:.0%} of the "
                           "stated fp32 peak"])


def _retrieve(cfg: CurateConfig, n: int, seeds: int, selected: int, rates: Rates, shape: ArrayShape,
              manifest_s: float, manifest_mem: float) -> StepPlan:
    from curate.steps.retrieve import selection_method

    dim = embedding_dim(cfg.embed)
    plan = StepPlan("retrieve", shape, images=selected, task_s=manifest_s, host_bytes=manifest_mem)
    if selection_method(cfg) != "retrieve":
        plan.basis.append(f"{selection_method(cfg)} selection: no search (reads the manifest and assignments)")
        return plan
    build, search, scanned, what = _index_work(cfg, n, dim, seeds, cfg.retrieve.n_per_seed)
    plan.gpu_flops, plan.scan_bytes, plan.read_bytes = build + search, scanned, 2.0 * n * dim
    plan.task_s += rates.gpu_s(build + search, scanned)
    plan.host_bytes += index_bytes(cfg, n, dim)  # the pool read from the store's memory maps, a partition at a time
    plan.gpu_bytes = index_bytes(cfg, n, dim)
    plan.basis.append(f"{seeds} seeds searched in the pool through {what}, at the stated fp32 peak and bandwidth")
    return plan


def _shard(selected: int, image_bytes: float, rates: Rates, shape: ArrayShape, manifest_s: float,
           manifest_mem: float) -> StepPlan:
    per_task = math.ceil(selected / shape.tasks)
    write_s = per_task * image_bytes * rates.cost("shard_write_s_per_byte")
    return StepPlan("shard", shape, images=selected, read_bytes=selected * image_bytes,
                    disk_bytes=selected * image_bytes, task_s=manifest_s + write_s, host_bytes=manifest_mem,
                    basis=["tar writing measured per byte (read + write on this machine's disk)"])


def _report(n: int, shape: ArrayShape, manifest_s: float, manifest_mem: float) -> StepPlan:
    return StepPlan("report", shape, images=n, task_s=manifest_s, host_bytes=manifest_mem,
                    basis=["manifest read measured per row; its image grids are a bounded sample (not counted)"])
