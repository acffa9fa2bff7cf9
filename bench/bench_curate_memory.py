"""Peak memory of each curation step after embed, at growing row counts; prints one JSON object.

Issue 25.2 asks every step to stream, so that 10x more rows costs <= 1.5x the peak memory beyond the embeddings'
own memory map. For each `--rows` size this builds a synthetic run directory without images (what ingest and embed
would have left: the manifest, float16 embeddings per partition and their markers, plus one byte file that every row
points into, so the shard step copies real bytes whose sha256 matches), then runs dedup, cluster, retrieve, shard and
report, each in a fresh process through the public `python -m curate STEP CONFIG` command line, and records that
process's peak RSS (ru_maxrss of the children of a small launcher python, which starts the step: about 10 MB of the
launcher's own is the floor of every figure) and wall time.

Data: unit float16 rows around `--clusters` random centres (cosine 0.6, as image embeddings gather), 2% of the pool
noisy copies of other pool rows (cosine ~0.86: near duplicates), 1% byte-identical files (exact duplicates), a few
pool rows copying evaluation rows (contamination), and `--seeds` seed rows near the centres. Seeds and evals stay the
same size at every scale, so only the pool grows.

The search settings keep the kNN work of 10^6 rows to minutes on 2 shared cores: `index.kind=ivf` with
`--nlist` cells and `--nprobe` probes, and retrieval in sample mode (`--n-per-seed` images per seed, so the shards
hold a few thousand samples at every size). This bench measures memory, not recall (bench_dedup.py measures recall).

    python bench/bench_curate_memory.py                       # 10^5 and 10^6 rows, dim 64
    python bench/bench_curate_memory.py --rows 1e5 1e6 1e7    # 10^7: 1.3 GB of float16 embeddings at dim 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.headline import headline  # noqa: E402
from curate.config import load_curate_config  # noqa: E402
from curate.embedding.store import EmbeddingStore  # noqa: E402
from curate.manifest import INGEST_SCHEMA, STATUS_SCHEMA, write_manifest  # noqa: E402
from curate.partition import partition_of  # noqa: E402
from curate.rundir import RunDir  # noqa: E402
from curate.steps import STEPS, step_named  # noqa: E402
from curate.steps.runner import expected_fingerprint  # noqa: E402

STEPS_MEASURED = ("dedup", "cluster", "retrieve", "shard", "report")
READ_EMBEDDINGS = ("dedup", "cluster", "retrieve")  # shard and report read no embedding
TARGET_RATIO = 1.5  # issue 25.2: 10x more rows, at most 1.5x the peak memory beyond the embeddings
MODEL = "synthetic"
SPAN = 16  # bytes of each row's "image" in the byte file: distinct random bytes, so sha256s differ
CENTRE_COSINE, COPY_NOISE = 0.6, 0.6  # row to its centre; copy noise per dimension, times 1/sqrt(dim)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_config(root: Path, args: argparse.Namespace) -> Path:
    """The run's YAML: three named sources (never read: ingest does not run), IVF search, sample retrieval."""
    doc = {
        "name": "memory", "runs_root": str(root / "runs"), "partitions": args.partitions,
        "sources": [{"path": str(root / "pool"), "name": "pool"}],
        "seeds": [{"path": str(root / "seeds"), "name": "seeds"}],
        "evals": [{"path": str(root / "evals"), "name": "evals"}],
        "index": {"kind": "ivf", "nlist": args.nlist, "nprobe": args.nprobe},
        "dedup": {"threshold": 0.75, "eval_threshold": 0.75, "use_gpu": "cpu"},
        "cluster": {"n_clusters": [args.clusters, 10], "use_gpu": "cpu"},
        "retrieve": {"mode": "sample", "n_per_seed": args.n_per_seed, "use_gpu": "cpu"},
        "report": {"thumb_size": 32, "max_groups": 4, "images_per_group": 4},
    }
    path = root / "memory.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def build_run(root: Path, n_pool: int, args: argparse.Namespace) -> Path:
    """A run directory as ingest and embed leave it, for `n_pool` pool rows; returns its config file."""
    rng = np.random.default_rng(args.seed)
    cfg_path = write_config(root, args)
    cfg = load_curate_config(cfg_path)
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True)
    n = n_pool + args.seeds + args.evals
    role = np.array(["pool"] * n_pool + ["seed"] * args.seeds + ["eval"] * args.evals, dtype=object)
    source = np.where(role == "pool", "pool", np.where(role == "seed", "seeds", "evals"))
    uids = [f"{v:016x}" for v in rng.permutation(n).tolist()]
    partition = np.fromiter((partition_of(u, args.partitions) for u in uids), dtype=np.int32, count=n)
    blob = rng.integers(0, 256, n * SPAN, dtype=np.uint8).tobytes()
    (root / "bytes.bin").write_bytes(blob)
    offset = np.arange(n, dtype=np.int64) * SPAN
    sha = [hashlib.sha256(blob[o:o + SPAN]).hexdigest() for o in offset.tolist()]
    exact = rng.choice(n_pool, size=(n_pool // 100, 2), replace=False)  # [copy, original]: same file, same bytes
    for copy, original in exact.tolist():
        sha[copy], offset[copy] = sha[original], offset[original]
    columns = {
        "uid": uids, "role": role.tolist(), "source": source.tolist(), "locator": [f"{u}.jpg" for u in uids],
        "file": pa.repeat(str(root / "bytes.bin"), n), "member": [f"{u}.jpg" for u in uids], "offset": offset,
        "partition": partition, "size": np.full(n, SPAN, dtype=np.int64), "sha256": sha,
        "format": pa.repeat("jpeg", n), "width": np.full(n, 64, dtype=np.int32),
        "height": np.full(n, 64, dtype=np.int32), "mode": pa.repeat("RGB", n),
        "reject_reason": pa.nulls(n, pa.string()),
    }
    status = {"status": pa.repeat("ok", n), "reason": pa.nulls(n, pa.string())}
    arrays = [pa.array(v, type=f.type) if not isinstance(v, pa.Array) else v.cast(f.type)
              for f, v in zip(pa.schema([*INGEST_SCHEMA, *STATUS_SCHEMA]), [*columns.values(), *status.values()],
                              strict=True)]
    write_manifest(pa.Table.from_arrays(arrays, schema=pa.schema([*INGEST_SCHEMA, *STATUS_SCHEMA])), run.manifest)
    write_embeddings(run, rng, role, uids, partition, exact, args)
    sections = lambda name: step_named(name).config(cfg)  # noqa: E731
    for name, summary in (("ingest", {"inputs": n}), ("embed", {"model": MODEL, "dim": args.dim,
                                                                "dedup_model": MODEL})):
        run.write_marker(name, expected_fingerprint(STEPS, run, name, sections), summary, time.time())
    return cfg_path


def write_embeddings(run: RunDir, rng: np.random.Generator, role: np.ndarray, uids: list[str],
                     partition: np.ndarray, exact: np.ndarray, args: argparse.Namespace) -> None:
    """float16 unit rows per partition: clustered pool, planted near and eval copies, seeds near the centres."""
    d = args.dim
    centres = unit(rng.standard_normal((args.clusters, d), dtype=np.float32))
    n_refs = args.seeds + args.evals
    refs = unit(CENTRE_COSINE * centres[rng.integers(0, args.clusters, n_refs)]
                + np.sqrt(1 - CENTRE_COSINE**2) * unit(rng.standard_normal((n_refs, d), dtype=np.float32)))
    evals = refs[args.seeds:]
    n_pool = int((role == "pool").sum())
    store = EmbeddingStore(run.embeddings(MODEL), args.partitions)
    for p in range(args.partitions):
        rows = np.nonzero(partition == p)[0]
        pool = rows[rows < n_pool]
        x = unit(CENTRE_COSINE * centres[rng.integers(0, args.clusters, len(pool))]
                 + np.sqrt(1 - CENTRE_COSINE**2) * unit(rng.standard_normal((len(pool), d), dtype=np.float32)))
        n_near = len(pool) // 50
        near = rng.choice(len(pool), size=(n_near, 2), replace=False)  # [copy, original] within the partition
        x[near[:, 0]] = x[near[:, 1]] + COPY_NOISE / np.sqrt(d) * rng.standard_normal((n_near, d), dtype=np.float32)
        contaminated = rng.choice(len(pool), size=min(2, len(pool)), replace=False)
        x[contaminated] = evals[rng.integers(0, len(evals), len(contaminated))] + COPY_NOISE / np.sqrt(d) * \
            rng.standard_normal((len(contaminated), d), dtype=np.float32)
        x = unit(x)
        emb = np.empty((len(rows), d), dtype=np.float32)
        emb[: len(pool)] = x
        emb[len(pool):] = refs[rows[len(pool):] - n_pool]
        store.write_partition(p, [uids[i] for i in rows], emb.astype(np.float16))
    # an exact copy's embedding is its original's (same bytes), wherever the two partitions are
    originals = dict(zip((int(c) for c in exact[:, 0]), store.gather([uids[o] for o in exact[:, 1]]), strict=True))
    for p in range(args.partitions):
        rows = np.nonzero(partition == p)[0]
        copies = [j for j, i in enumerate(rows.tolist()) if i in originals]
        if copies:
            part_uids, emb = store.read_partition(p, mmap=False)
            emb[copies] = np.stack([originals[int(rows[j])] for j in copies])
            store.write_partition(p, part_uids, emb)
    store.write_index(MODEL, d)


# The step runs under a small python that reports its peak RSS: a process forked from this bench would start with
# the bench's own peak (Linux carries it over fork and exec), which here holds a whole synthetic run.
MEASURE = ("import resource, subprocess, sys\n"
           "with open(sys.argv[1], 'w') as log:\n"
           "    rc = subprocess.call(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)\n"
           "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")


def run_step(step: str, cfg_path: Path, log_path: Path) -> dict:
    """Run `python -m curate STEP CONFIG` in a fresh process: its peak RSS (MiB) and wall seconds."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE, str(log_path), sys.executable, "-m", "curate", step,
                          str(cfg_path)], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    seconds = time.perf_counter() - start
    if int(out[0]) != 0:
        raise RuntimeError(f"python -m curate {step} {cfg_path} exited {out[0]}; see {log_path}")
    return {"peak_rss_mib": round(int(out[1]) / 1024, 1), "wall_s": round(seconds, 1)}


def measure(rows: int, workdir: Path, args: argparse.Namespace) -> dict:
    """Build the run of `rows` pool rows and measure each step; one size's block of the JSON object."""
    root = workdir / f"rows_{rows}"
    t = time.perf_counter()
    cfg_path = build_run(root, rows, args)
    emb_bytes = sum(f.stat().st_size for f in (root / "runs" / "memory" / "embeddings" / MODEL).glob("*.npy"))
    out = {"rows": rows, "embeddings_mib": round(emb_bytes / 2**20, 1), "build_s": round(time.perf_counter() - t, 1),
           "steps": {}}
    for step in args.steps:
        m = run_step(step, cfg_path, root / f"{step}.log")
        # the memory beyond the embeddings' own memory map, for the steps that map them
        m["beyond_embeddings_mib"] = round(m["peak_rss_mib"] - (emb_bytes / 2**20 if step in READ_EMBEDDINGS else 0), 1)
        out["steps"][step] = m
        print(f"rows={rows} {step}: {m}", file=sys.stderr, flush=True)
    return out


def growth(sizes: list[dict]) -> dict:
    """Per step, each size's peak over the previous size's: raw, and beyond the embeddings' bytes."""
    out = {}
    for step in sizes[0]["steps"]:
        out[step] = [{"rows": f"{a['rows']}->{b['rows']}",
                      "peak_ratio": round(b["steps"][step]["peak_rss_mib"] / a["steps"][step]["peak_rss_mib"], 3),
                      "beyond_embeddings_ratio": round(b["steps"][step]["beyond_embeddings_mib"]
                                                       / max(a["steps"][step]["beyond_embeddings_mib"], 1.0), 3)}
                     for a, b in zip(sizes, sizes[1:], strict=False)]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=float, nargs="+", default=[1e5, 1e6], help="pool sizes (default 1e5 1e6)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=100, help="data centres and finest k-means level")
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--evals", type=int, default=1000)
    parser.add_argument("--n-per-seed", type=int, default=4)
    parser.add_argument("--nlist", type=int, default=0, help="IVF cells (index.nlist; 0: 4 sqrt(rows))")
    parser.add_argument("--nprobe", type=int, default=2, help="IVF cells scanned per query (index.nprobe)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS_MEASURED), choices=STEPS_MEASURED)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the run directories here (default: a temporary one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sorted(int(r) for r in args.rows)
    with tempfile.TemporaryDirectory(prefix="bench_curate_memory_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        results = [measure(rows, workdir, args) for rows in sizes]
    ratios = growth(results)
    worst = max((r["beyond_embeddings_ratio"] for rs in ratios.values() for r in rs), default=None)
    print(json.dumps({
        "headline": headline(f"worst step's peak RSS beyond the embeddings, per 10x rows (target <= {TARGET_RATIO})",
                             worst, "the same step at the previous size"),
        "sizes": results, "growth": ratios, "target_ratio": TARGET_RATIO,
        "settings": {k: v for k, v in vars(args).items() if k not in ("rows", "workdir")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
