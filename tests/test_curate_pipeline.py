"""End to end on real photos: `python -m curate run`, the accounting invariant, kill-and-rerun equality, Slurm-style
partitioned calls, and shards readable by webdataset and by the pretraining loader.

Pool: 120 Imagenette + 120 Imagewoof photos, three exact byte copies, a re-encoded copy of two evaluation images,
and three broken files. Embedding: the `copydetect` embedder (made for copy detection, no weights to download).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from curate_photos import photo_paths
from PIL import Image

from curate.config import load_curate_config  # noqa: E402
from curate.dedup.config import COPYDETECT_THRESHOLDS  # noqa: E402
from curate.manifest import check_accounting, read_manifest  # noqa: E402
from curate.rundir import RunDir  # noqa: E402
from curate.shards.writer import verify_shards  # noqa: E402
from curate.steps import run_all, run_step  # noqa: E402
from dinoforge.data.datasets import build_dataset  # noqa: E402
from dinoforge.data.shard_index import read_index  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_PER_CLASS = 12  # x 10 classes x 2 datasets = 240 real photos


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Source folders with planted problems, and what the pipeline must find in them."""
    root = tmp_path_factory.mktemp("curate_inputs")
    pool, seeds, evals = root / "pool", root / "seeds", root / "evals"
    for d in (pool / "nette", pool / "woof", pool / "planted", seeds, evals):
        d.mkdir(parents=True)
    nette = photo_paths("imagenette", "train", per_class=N_PER_CLASS)
    woof = photo_paths("imagewoof", "train", per_class=N_PER_CLASS)
    for src, sub in ((nette, "nette"), (woof, "woof")):
        for p in src:
            shutil.copy(p, pool / sub / f"{p.parent.name}_{p.name}")
    copies = {}
    for i, p in enumerate([nette[0], nette[50], woof[7]]):
        target = pool / "planted" / f"exact_copy_{i}.jpg"
        shutil.copy(p, target)
        copies[f"planted/{target.name}"] = f"{'nette' if p in nette else 'woof'}/{p.parent.name}_{p.name}"
    val = photo_paths("imagenette", "val", per_class=2)
    for p in val[:10]:
        shutil.copy(p, seeds / p.name)
    for p in val[10:14]:
        shutil.copy(p, evals / p.name)
    contaminating = {}
    for i, p in enumerate(val[10:12]):  # re-encoded copies of eval images hidden in the pool
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, format="JPEG", quality=60)
        (pool / "planted" / f"eval_copy_{i}.jpg").write_bytes(buf.getvalue())
        contaminating[f"planted/eval_copy_{i}.jpg"] = p.name
    good = nette[1].read_bytes()
    (pool / "planted" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (pool / "planted" / "zero.jpg").write_bytes(b"")
    (pool / "planted" / "readme.jpg").write_text("this is not a photo")
    broken = {"planted/truncated.jpg": "truncated or corrupt", "planted/zero.jpg": "empty file",
              "planted/readme.jpg": "not an image"}
    n_files = sum(1 for p in pool.rglob("*") if p.is_file())
    return {"root": root, "pool": pool, "seeds": seeds, "evals": evals, "copies": copies, "broken": broken,
            "contaminating": contaminating, "n_pool_files": n_files}


def _config(inputs: dict, runs_root: Path) -> Path:
    """A YAML config over the planted inputs (small partitions and shards so both are exercised)."""
    doc = {
        "name": "e2e",
        "runs_root": str(runs_root),
        "partitions": 4,
        "sources": [{"path": str(inputs["pool"]), "name": "pool"}],
        "seeds": [{"path": str(inputs["seeds"]), "name": "seeds"}],
        "evals": [{"path": str(inputs["evals"]), "name": "evals"}],
        "embed": {"kind": "copydetect", "batch_size": 32, "num_workers": 0},
        # The copy-detection descriptor's own operating point (DINOv2's 0.6 / 0.45 are for SSCD features).
        "dedup": {"threshold": COPYDETECT_THRESHOLDS[0], "eval_threshold": COPYDETECT_THRESHOLDS[0]},
        "retrieve": {"mode": "sample", "n_per_seed": 12},
        "shards": {"max_count": 16, "max_bytes": 1 << 20},
        "report": {"thumb_size": 48, "max_groups": 4, "images_per_group": 4},
    }
    path = runs_root.parent / f"{runs_root.name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def reference(inputs) -> dict:
    """One uninterrupted in-process run."""
    runs_root = inputs["root"] / "runs_ref"
    cfg_path = _config(inputs, runs_root)
    cfg = load_curate_config(cfg_path)
    results = run_all(cfg)
    return {"cfg": cfg, "cfg_path": cfg_path, "run": RunDir(cfg.run_dir), "results": results}


def _rows(run: RunDir) -> dict[str, dict]:
    return {f"{r['source']}:{r['locator']}": r for r in read_manifest(run.manifest).to_pylist()}


def test_every_input_is_accounted_for(inputs, reference):
    run = reference["run"]
    table = read_manifest(run.manifest)
    counts = check_accounting(table, final=True)
    assert sum(counts.values()) == inputs["n_pool_files"]  # counted from the file system, not from the manifest
    assert counts["selected"] > 0 and counts["not_selected"] > 0
    assert [r.status for r in reference["results"]] == ["done"] * 7
    for step in ("ingest", "embed", "dedup", "cluster", "retrieve", "shard", "report"):
        assert run.marker(step).is_file()
    assert (run.root / "config.yaml").is_file()


def test_planted_problems_are_found(inputs, reference):
    rows = _rows(reference["run"])
    for loc, reason in inputs["broken"].items():
        r = rows[f"pool:{loc}"]
        assert r["status"] == "rejected" and r["reason"].startswith(reason), r["reason"]
    for copy, original in inputs["copies"].items():
        pair = [rows[f"pool:{copy}"], rows[f"pool:{original}"]]
        # (status is "duplicate", or "contaminated" when the group also touches an eval image: that wins)
        removed = [r for r in pair if r["duplicate_kind"] == "exact" and r["status"] in ("duplicate", "contaminated")]
        assert len(removed) == 1, [(r["status"], r["duplicate_kind"]) for r in pair]
        other = pair[1] if removed[0] is pair[0] else pair[0]
        assert removed[0]["duplicate_of"] == other["uid"] and removed[0]["sha256"] == other["sha256"]
    evals = {r["locator"]: r["uid"] for r in rows.values() if r["role"] == "eval"}
    for copy, eval_name in inputs["contaminating"].items():
        r = rows[f"pool:{copy}"]
        assert r["status"] == "contaminated" and r["contaminated_by"] == evals[eval_name], r["reason"]
    # ... and nothing else: these photos hold no other copies (precision, not only recall).
    removed = {k for k, r in rows.items() if r["status"] in ("duplicate", "contaminated")}
    planted_pairs = {f"pool:{c}" for c in inputs["copies"]} | {f"pool:{o}" for o in inputs["copies"].values()}
    assert len(removed) == len(inputs["copies"]) + len(inputs["contaminating"])
    assert removed <= planted_pairs | {f"pool:{c}" for c in inputs["contaminating"]}


def test_selected_samples_are_explained(reference):
    rows = _rows(reference["run"])
    seed_uids = {r["uid"] for r in rows.values() if r["role"] == "seed"}
    for r in rows.values():
        if r["status"] == "selected":
            kind, _, ref = r["selected_by"].partition(":")
            assert kind == "seed" and ref in seed_uids
            assert r["retrieval_score"] is not None


def test_shards_hold_exactly_the_selected_samples(reference):
    import webdataset as wds

    run = reference["run"]
    table = read_manifest(run.manifest)
    selected = {r["uid"]: r for r in table.filter(pc.equal(table.column("status"), "selected")).to_pylist()}
    assert verify_shards(run.shards) == []
    infos = read_index(run.shards).shards
    assert sum(i.count for i in infos) == len(selected) and all(i.count <= 16 for i in infos)
    assert len(infos) > 1
    seen = {}
    urls = [str(run.shards / i.file) for i in infos]
    for sample in wds.WebDataset(urls, shardshuffle=False):
        image_key = next(k for k in ("jpg", "png", "webp") if k in sample)
        meta = json.loads(sample["json"])
        seen[sample["__key__"]] = (hashlib.sha256(sample[image_key]).hexdigest(), meta)
    assert set(seen) == set(selected)
    for uid, (sha, meta) in seen.items():
        assert sha == selected[uid]["sha256"] and meta["uid"] == uid
        assert meta["selected_by"] == selected[uid]["selected_by"]
    assert not list(run.shards.glob("*.tmp"))


def test_pretraining_loader_reads_the_run(reference):
    ds = build_dataset(str(reference["run"].root), with_labels=False)
    n_selected = sum(r["status"] == "selected" for r in _rows(reference["run"]).values())
    assert len(ds) == n_selected
    assert isinstance(ds[0], Image.Image)


def test_report_has_pictures(reference):
    html = (reference["run"].report / "index.html").read_text()
    assert html.count("data:image/jpeg;base64,") >= 8 and "Largest duplicate groups" in html


def test_rerun_skips_everything(reference):
    results = run_all(reference["cfg"])
    assert [r.status for r in results] == ["skipped"] * 7


def test_forced_ingest_redoes_the_steps_after_it(reference, tmp_path):
    """Ingest rewrites the manifest: every later step must run again (not skip on a stale marker), to the same end."""
    shutil.copytree(reference["run"].root, tmp_path / "runs" / "e2e")
    cfg = load_curate_config(reference["cfg_path"], [f"runs_root={tmp_path / 'runs'}"])
    assert run_step("ingest", cfg, force=True).status == "done"
    assert [r.status for r in run_all(cfg)] == ["skipped"] + ["done"] * 6
    _same_outputs(reference["run"], RunDir(cfg.run_dir))


def _cli(cfg_path: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "curate", *args[:1], str(cfg_path), *args[1:]], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _same_outputs(a: RunDir, b: RunDir) -> None:
    assert read_manifest(a.manifest).equals(read_manifest(b.manifest))
    names = sorted(p.name for p in a.shards.glob("*.tar"))
    assert names == sorted(p.name for p in b.shards.glob("*.tar"))
    for name in names:
        assert (a.shards / name).read_bytes() == (b.shards / name).read_bytes(), name
    assert json.loads((a.shards / "index.json").read_text()) == json.loads((b.shards / "index.json").read_text())


# `python -m curate` whose embed step stops after its first partition, says so in a file and waits to be killed: the
# kill lands at a known point instead of racing the run
_HELD_AFTER_ONE_PARTITION = """
import sys, time
from pathlib import Path
from curate.embedding import store
from curate.__main__ import main

write = store.EmbeddingStore.write_partition

def write_then_hold(self, *args, **kwargs):
    write(self, *args, **kwargs)
    Path(sys.argv[1]).write_text("held")
    while True:
        time.sleep(1)

store.EmbeddingStore.write_partition = write_then_hold
sys.exit(main(sys.argv[2:]))
"""


def test_killed_run_resumes_to_identical_outputs(inputs, reference):
    """SIGKILL `python -m curate run` once an embedding partition exists, run again: same manifest and shards."""
    runs_root = inputs["root"] / "runs_killed"
    cfg_path = _config(inputs, runs_root)
    run = RunDir(runs_root / "e2e")
    held = inputs["root"] / "held_after_one_partition"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", _HELD_AFTER_ONE_PARTITION, str(held), "run", str(cfg_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while not held.exists() and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before its first partition: " + proc.stdout.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    parts = list((run.root / "embeddings").glob("*/part-*.npy"))
    assert len(parts) == 1 and not run.marker("embed").exists()
    again = _cli(cfg_path, "run")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out.decode()[-3000:]
    assert "skipping" in out.decode()  # ingest was complete and is not redone
    _same_outputs(reference["run"], run)


def test_shard_step_resumes_partial_output(reference, tmp_path):
    """A shard never written, one renamed but not recorded, one half-written under its temporary name: a rerun
    writes exactly the missing ones and ends with the same bytes; finished shards are not touched."""
    shutil.copytree(reference["run"].root, tmp_path / "runs" / "e2e")
    cfg = load_curate_config(reference["cfg_path"], [f"runs_root={tmp_path / 'runs'}"])
    run = RunDir(cfg.run_dir)
    run.marker("shard").unlink()
    (run.shards / "index.json").unlink()
    shards = sorted(run.shards.glob("*.tar"))
    shards[0].unlink()
    (run.shards / "_parts" / "000001.json").unlink()
    half = shards[2].with_name(f".{shards[2].name}.99999.tmp")  # a killed writer's temporary file
    half.write_bytes(shards[2].read_bytes()[:5000])
    shards[2].unlink()
    part_tmp = run.shards / "_parts" / ".000003.json.99999.tmp"  # killed while recording a finished shard
    part_tmp.write_text("{")
    untouched = {p.name: p.stat().st_mtime_ns for p in shards[3:]}
    result = run_step("shard", cfg)
    assert result.status == "done" and result.summary["this_call"]["written_now"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in shards[3:]} == untouched
    _same_outputs(reference["run"], run)
    assert not half.exists() and not part_tmp.exists()
    assert not list(run.shards.rglob("*.tmp"))


def test_shard_call_removes_only_the_temporaries_of_its_partitions(reference, tmp_path):
    """An array task cleans what killed writers left for its own partitions; other partitions' temporaries may be
    live writers of other tasks."""
    shutil.copytree(reference["run"].root, tmp_path / "runs" / "e2e")
    cfg = load_curate_config(reference["cfg_path"], [f"runs_root={tmp_path / 'runs'}"])
    run = RunDir(cfg.run_dir)
    run.marker("shard").unlink()
    first_shard_of: dict[int, str] = {}
    for info in read_index(run.shards).shards:
        first_shard_of.setdefault(info.partition, info.file)
    assert 0 in first_shard_of and len(first_shard_of) > 1
    temps = {p: run.shards / f".{name}.99999.tmp" for p, name in first_shard_of.items()}
    for path in temps.values():
        path.write_bytes(b"partial")
    run_step("shard", cfg, partitions=[0])
    assert sorted(p for p, path in temps.items() if path.exists()) == sorted(set(first_shard_of) - {0})


def test_rerunning_a_step_clears_the_statuses_of_the_steps_after_it(reference, tmp_path):
    """dedup at a new threshold: no row may keep `not_selected` (or a cluster) from the retrieve and cluster runs
    that read the old dedup; the manifest shows only the steps that are current, until they run again."""
    shutil.copytree(reference["run"].root, tmp_path / "runs" / "e2e")
    cfg = load_curate_config(reference["cfg_path"], [f"runs_root={tmp_path / 'runs'}", "dedup.threshold=0.9"])
    before = read_manifest(RunDir(cfg.run_dir).manifest)
    assert {"selected", "not_selected"} <= set(before.column("status").to_pylist())
    assert run_step("dedup", cfg).status == "done"
    table = read_manifest(RunDir(cfg.run_dir).manifest)
    assert set(table.column("status").to_pylist()) == {"ok", "rejected", "duplicate", "contaminated"}
    assert not {"selected", "selected_by", "retrieval_score", "cluster_l1"} & set(table.column_names)
    check_accounting(table)
    assert [r.status for r in run_all(cfg)] == ["skipped"] * 3 + ["done"] * 4
    assert "not_selected" in read_manifest(RunDir(cfg.run_dir).manifest).column("status").to_pylist()


def test_partitioned_calls_match_one_process(inputs, reference):
    """Slurm-array style: embed, dedup and shard a few partitions per call, then the rest of the run; same outputs."""
    runs_root = inputs["root"] / "runs_array"
    cfg = load_curate_config(_config(inputs, runs_root))
    run_step("ingest", cfg)
    for p in (2, 0, 3):
        assert run_step("embed", cfg, partitions=[p]).status == "partial"
    assert run_step("embed", cfg, partitions=[1]).status == "done"
    assert run_step("dedup", cfg, partitions=[1, 3]).status == "partial"
    assert run_step("dedup", cfg, partitions=[0, 2]).status == "done"
    for step in ("cluster", "retrieve"):
        run_step(step, cfg)
    assert run_step("shard", cfg, partitions=[0, 1]).status == "partial"
    assert run_step("shard", cfg, partitions=[2, 3]).status == "done"
    run_all(cfg)
    _same_outputs(reference["run"], RunDir(cfg.run_dir))


def test_command_line_errors_are_clear(inputs, tmp_path, capsys):
    from curate.__main__ import main

    cfg_path = str(_config(inputs, tmp_path / "runs"))
    cases = [
        (["run", cfg_path, "dedup.treshold=0.5"], 2, "did you mean 'dedup.threshold'"),
        (["run", cfg_path, "embed.kind=sscd"], 2, "embed.kind='sscd': use one of"),
        (["dedup", cfg_path], 3, "needs step 'embed' first, which has not run"),
        (["run", cfg_path, "--partitions", "1"], 2, "applies to a single step"),
        (["cluster", cfg_path, "--partitions", "1"], 2, "applies to embed, dedup, shard only"),
        (["embed", cfg_path, "--partitions", "7"], 2, "outside 0..3"),
        (["embed", cfg_path, "--partitions", "1", "--force"], 2, "force the whole step once"),
    ]
    for argv, code, message in cases:
        assert main(argv) == code, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out


def test_separate_dedup_embedding(tmp_path):
    """`dedup_embed` (copy detection) drives dedup and decontamination; `embed` (here a random ViT) the rest."""
    pool, evals = tmp_path / "pool", tmp_path / "evals"
    pool.mkdir()
    evals.mkdir()
    photos = photo_paths("imagenette", per_class=2)
    for p in photos:
        shutil.copy(p, pool / p.name)
    shutil.copy(photos[3], pool / "copy.jpg")
    shutil.copy(photos[7], evals / "eval.jpg")
    doc = {"name": "two", "runs_root": str(tmp_path / "runs"), "partitions": 2, "sources": [{"path": str(pool)}],
           "evals": [{"path": str(evals)}],
           "embed": {"kind": "random_vit", "arch": "vit_tiny", "patch_size": 16, "image_size": 64, "num_workers": 0},
           "dedup_embed": {"kind": "copydetect"},
           "dedup": {"threshold": COPYDETECT_THRESHOLDS[0], "eval_threshold": COPYDETECT_THRESHOLDS[0]},
           "select": {"method": "balanced", "n_balanced": 8}, "cluster": {"n_clusters": [4, 2]}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_curate_config(tmp_path / "two.yaml")
    run_all(cfg)
    run = RunDir(cfg.run_dir)
    assert sorted(p.name for p in (run.root / "embeddings").iterdir()) == ["copydetect-v1",
                                                                          "random_vit-vit_tiny16-seed0-64"]
    rows = _rows(run)
    assert {k for k, r in rows.items() if r["status"] in ("duplicate", "contaminated")} == {
        "pool:copy.jpg" if rows["pool:copy.jpg"]["uid"] > rows[f"pool:{photos[3].name}"]["uid"]
        else f"pool:{photos[3].name}", f"pool:{photos[7].name}"}
    selected = [r for r in rows.values() if r["status"] == "selected"]
    assert len(selected) == 8 and all(r["selected_by"].startswith("balanced:2/") for r in selected)
