"""Curation on the local Slurm: partitioned steps as job arrays (bounded parallelism) chained by `afterok`, ending
with the manifest of an in-process run; a failed array task is reported with its log and rerun alone, and the
partitions that succeeded are not redone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 3

pytestmark = pytest.mark.slurm


def make_pool(pool: Path, count: int = 30) -> None:
    """`count` small distinct JPEGs (smooth random colour fields) and one exact copy."""
    pool.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((64, 64), Image.BICUBIC).save(pool / f"img{i:02d}.jpg", quality=90)
    (pool / "copy.jpg").write_bytes((pool / "img05.jpg").read_bytes())


def write_config(path: Path, pool: Path, runs_root: Path) -> Path:
    doc = {"name": "tiny", "runs_root": str(runs_root), "partitions": PARTITIONS,
           "sources": [{"path": str(pool), "name": "pool"}], "ingest": {"num_workers": 0},
           "embed": {"kind": "copydetect", "batch_size": 16, "num_workers": 0},
           "dedup": {"threshold": 0.8, "eval_threshold": 0.8}, "cluster": {"n_clusters": [4, 2]},
           "report": {"thumb_size": 32, "max_groups": 2, "images_per_group": 2}}
    path.write_text(yaml.safe_dump(doc))
    return path


def slurm_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m slurm submit curate ARGS --wait` on the local cluster (profile `local`: 2 array tasks at once)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "slurm", "submit", "curate", *args, "--profile", "local",
                           "--array-parallelism", "2", "--wait", "--wait-timeout", str(timeout - 20)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def manifest(run_dir: Path) -> list[dict]:
    """The manifest's rows by uid (it has no timing columns: two runs of the same config must agree exactly)."""
    return sorted(pq.read_table(run_dir / "manifest.parquet").to_pylist(), key=lambda row: row["uid"])


def mtimes(paths: list[Path]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


@pytest.mark.timeout(900)
def test_curation_arrays_fail_per_partition_rerun_alone_and_match_in_process(slurm_cluster, tmp_path):
    pool = tmp_path / "pool"
    make_pool(pool)
    config = write_config(tmp_path / "tiny.yaml", pool, tmp_path / "runs")
    reference = write_config(tmp_path / "reference.yaml", pool, tmp_path / "reference")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_CONF", None)
    inprocess = subprocess.run([sys.executable, "-m", "curate", "run", str(reference)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
    assert inprocess.returncode == 0, inprocess.stderr[-3000:]

    # ingest first, then an input vanishes (moved away on the shared file system): one embed partition fails
    ingest = slurm_cli("ingest", str(config))
    assert ingest.returncode == 0, ingest.stdout + ingest.stderr
    run_dir = tmp_path / "runs" / "tiny"
    rows = manifest(run_dir)
    victim = next(row for row in rows if row["partition"] == 1 and row["status"] == "ok")
    moved = Path(victim["file"]).rename(tmp_path / "moved.jpg")

    failed = slurm_cli(str(config))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    report = failed.stdout
    assert "FAILED (python -m curate embed" in report and "--partitions 1)" in report, report
    assert "No such file" in report and victim["file"] in report, report
    assert "rerun it alone: python -m slurm submit curate embed" in report, report
    assert "never started" in report, report  # the closing task and every later step: cancelled, not pending
    scripts = [path.read_text() for path in (run_dir / "slurm").rglob("*_submission.sh")]
    assert sum(f"#SBATCH --array=0-{PARTITIONS - 1}%2" in text for text in scripts) == 3  # embed, dedup, shard
    embeddings = run_dir / "embeddings" / "copydetect-v1"
    done_parts = sorted(p for p in embeddings.iterdir() if p.is_file())
    assert done_parts and not (run_dir / "_SUCCESS.embed").exists()
    untouched = mtimes([run_dir / "_SUCCESS.ingest", run_dir / "manifest.parquet", *done_parts])

    Path(moved).rename(victim["file"])  # the file is back: rerun the failed task alone, then the rest
    rerun = slurm_cli("embed", str(config), "--partitions", "1")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "2 of 2 jobs completed" in rerun.stdout, rerun.stdout  # the task for partition 1, the closing task
    rest = slurm_cli(str(config))
    assert rest.returncode == 0, rest.stdout + rest.stderr
    # ingest and embed are complete: only dedup (array + closing task), cluster, retrieve, shard (array + closing
    # task) and report are submitted
    assert f"{2 * PARTITIONS + 5} of {2 * PARTITIONS + 5} jobs completed" in rest.stdout, rest.stdout
    assert mtimes(list(untouched))[run_dir / "_SUCCESS.ingest"] == untouched[run_dir / "_SUCCESS.ingest"]
    assert {p: t for p, t in mtimes(done_parts).items()} == {p: untouched[p] for p in done_parts}
    for step in ("ingest", "embed", "dedup", "cluster", "retrieve", "shard", "report"):
        assert (run_dir / f"_SUCCESS.{step}").is_file(), step
    assert manifest(run_dir) == manifest(tmp_path / "reference" / "tiny")
