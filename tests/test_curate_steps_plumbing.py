"""Step plumbing without models: embedding store, completion markers and fingerprints, partial-output handling."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

import curate.steps.dedup
from curate.embedding.rows import manifest_rows
from curate.embedding.store import EmbeddingStore, EmbeddingStoreError
from curate.rundir import RunDir, fingerprint
from curate.steps import STEPS, Step, downstream, runner, step_named
from curate.steps.runner import StepOrderError, expected_fingerprint, invalidate_later, owning_step, semantic


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_store_roundtrip_and_gather_in_any_order(tmp_path):
    store = EmbeddingStore(tmp_path / "emb", n_partitions=3)
    parts = {p: ([f"u{p}_{i}" for i in range(4 + p)], _unit(4 + p, 8, p)) for p in range(3)}
    for p, (uids, emb) in parts.items():
        assert not store.has_partition(p)
        store.write_partition(p, uids, emb)
    assert store.missing_partitions() == []
    store.write_index("model-x", 8)
    wanted = ["u2_5", "u0_0", "u1_3", "u0_3", "u2_0"]
    expected = np.stack([parts[int(u[1])][1][int(u.split("_")[1])] for u in wanted])
    np.testing.assert_array_equal(store.gather(wanted), expected)
    assert store.gather([]).shape == (0, 8)
    with pytest.raises(EmbeddingStoreError, match="1 manifest rows have no embedding"):
        store.gather(["u0_0", "nope"])


def test_embedding_rows_read_the_manifest_rows_from_the_memory_maps(tmp_path):
    store = EmbeddingStore(tmp_path / "emb", n_partitions=3)
    for p in range(3):
        store.write_partition(p, [f"u{p}_{i}" for i in range(4 + p)], _unit(4 + p, 8, p))
    wanted = ["u2_5", "u0_0", "u1_3", "u0_3", "u2_0"]
    table = pa.table({"uid": wanted, "partition": pa.array([int(u[1]) for u in wanted], pa.int32())})
    rows = manifest_rows(store, table)
    assert rows.shape == (5, 8) and len(rows) == 5
    np.testing.assert_array_equal(rows[:], store.gather(wanted))
    np.testing.assert_array_equal(rows[np.array([4, 1])], store.gather(["u2_0", "u0_0"]))
    table = pa.table({"uid": ["u1_0", "u1_9"], "partition": pa.array([1, 1], pa.int32())})
    with pytest.raises(EmbeddingStoreError, match="1 manifest rows of partition 1 have no embedding .* uid u1_9"):
        manifest_rows(store, table)


def test_store_refuses_unnormalised_or_misaligned(tmp_path):
    store = EmbeddingStore(tmp_path, 2)
    with pytest.raises(EmbeddingStoreError, match="not L2-normalised"):
        store.write_partition(0, ["a", "b"], np.ones((2, 4), dtype=np.float16))
    with pytest.raises(EmbeddingStoreError, match=r"\(3, 4\) embeddings for 2 uids"):
        store.write_partition(0, ["a", "b"], _unit(3, 4, 0))
    store.write_partition(0, ["a"], _unit(1, 4, 0))
    with pytest.raises(EmbeddingStoreError, match=r"partitions \[1\] are not embedded yet"):
        store.write_index("m", 4)


def _sections(values: dict):
    return lambda step: values.get(step, {})


def test_markers_skip_when_current_and_redo_when_config_changes(tmp_path):
    run = RunDir(tmp_path)
    cfg = {"ingest": {"sources": ["a"]}, "embed": {"arch": "vit_tiny", "batch_size": 32}}
    with pytest.raises(StepOrderError, match="needs step 'ingest' first, which has not run"):
        expected_fingerprint(STEPS, run, "embed", _sections(cfg))
    f_ingest = expected_fingerprint(STEPS, run, "ingest", _sections(cfg))
    run.write_marker("ingest", f_ingest, {"inputs": 3}, time.time())
    assert run.is_done("ingest", f_ingest)
    f_embed = expected_fingerprint(STEPS, run, "embed", _sections(cfg))
    run.write_marker("embed", f_embed, {}, time.time())
    # Speed knobs do not change what a step produces.
    faster = {**cfg, "embed": {"arch": "vit_tiny", "batch_size": 256}}
    assert expected_fingerprint(STEPS, run, "embed", _sections(faster)) == f_embed
    # A changed upstream config makes the downstream marker out of date.
    changed = {**cfg, "ingest": {"sources": ["a", "b"]}}
    with pytest.raises(StepOrderError, match="'ingest' first, which is out of date"):
        expected_fingerprint(STEPS, run, "embed", _sections(changed))
    new_ingest = expected_fingerprint(STEPS, run, "ingest", _sections(changed))
    assert not run.is_done("ingest", new_ingest) and not run.marker("ingest").exists()  # stale marker removed
    run.write_marker("ingest", new_ingest, {}, time.time())
    assert expected_fingerprint(STEPS, run, "embed", _sections(changed)) != f_embed
    # The report covers what has run, without requiring every step.
    assert expected_fingerprint(STEPS, run, "report", _sections(changed), required=False)


def test_fingerprint_helpers():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert semantic({"k": 64, "num_workers": 8, "nested": [{"device": "cuda", "x": 1}]}) == {"k": 64,
                                                                                            "nested": [{"x": 1}]}


def test_prepare_output_keeps_matching_partials_and_wipes_stale(tmp_path):
    run = RunDir(tmp_path)
    out = tmp_path / "embeddings" / "m"
    run.prepare_output(out, "fp1")
    (out / "part-00000.npy").write_bytes(b"x")
    run.prepare_output(out, "fp1")
    assert (out / "part-00000.npy").exists()  # resumable: same fingerprint keeps finished partitions
    run.prepare_output(out, "fp2")
    assert not (out / "part-00000.npy").exists() and (out / "_FINGERPRINT").read_text().strip() == "fp2"


def _planted(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors with groups of near-copies (noise 0.05) among unrelated ones."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    for g in range(0, n // 2, 5):  # rows g..g+2 copy row g
        x[g + 1:g + 3] = x[g] + 0.05 * rng.normal(size=(2, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n_partitions", [1, 3, 7])
def test_partitioned_dedup_equals_in_memory_dedup(n_partitions):
    from curate.dedup.kernels import decontaminate, near_duplicates
    from curate.dedup.partitions import merge_partitions, query_partition

    x = _planted(300, 32, 0)
    evals = np.concatenate([x[[0, 40, 299]] + 0.02, _planted(5, 32, 1)])
    evals /= np.linalg.norm(evals, axis=1, keepdims=True)
    uids = [f"{(7919 * i) % 1000:04d}-{i}" for i in range(len(x))]  # uid order differs from row order
    eval_uids = [f"e{i}" for i in range(len(evals))]
    dup, comp = near_duplicates(x, uids, k=8, threshold=0.8, use_gpu="cpu")
    matched = decontaminate(x, evals, eval_uids, 0.7, comp, use_gpu="cpu")
    part = np.random.default_rng(1).integers(0, n_partitions, len(x))
    parts = [query_partition(x, np.nonzero(part == p)[0], evals, 8, 0.8, np.zeros(0, dtype=np.int64), "cpu")
             for p in range(n_partitions)]
    merged = merge_partitions(len(x), parts, uids, 0.7, "first_uid")
    np.testing.assert_array_equal(merged.duplicate_of, dup)
    np.testing.assert_array_equal(merged.component, comp)
    assert [None if e < 0 else eval_uids[e] for e in merged.contaminated_by] == matched
    # every planted copy found: 30 groups of 3 lose 2 each; eval copies of rows 0, 40 (groups of 3) and 299
    assert (dup >= 0).sum() == 60 and sum(m is not None for m in matched) == 7
    np.testing.assert_allclose(merged.eval_sim, (x @ evals.T).max(axis=1), atol=1e-5)


def test_partition_queries_roundtrip(tmp_path):
    from curate.dedup.partitions import PartitionQueries, query_partition

    x = _planted(40, 8, 2)
    found = query_partition(x, np.arange(0, 40, 2), None, 4, 0.5, np.array([0, 10]), "cpu")
    found.save(tmp_path / "part-00000.npz")
    back = PartitionQueries.load(tmp_path / "part-00000.npz")
    for name in ("rows", "edge_i", "edge_j", "edge_sim", "eval_index", "nn_rows", "nn_sim"):
        np.testing.assert_array_equal(getattr(back, name), getattr(found, name))
    sims = x[[0, 10]] @ x.T
    sims[[0, 1], [0, 10]] = -np.inf
    np.testing.assert_allclose(back.nn_sim, sims.max(axis=1), atol=1e-5)
    assert np.isnan(back.eval_sim).all() and (back.eval_index == -1).all()


def test_shipped_configs_load():
    from pathlib import Path

    from curate.config import load_curate_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs" / "curate").glob("*.yaml"))
    assert {p.name for p in configs} >= {"cpu_demo.yaml", "imagenette.yaml"}
    for path in configs:
        cfg = load_curate_config(path)
        assert cfg.name == path.stem and cfg.sources


def test_a_step_that_runs_invalidates_the_steps_after_it(tmp_path):
    run = RunDir(tmp_path)
    sections = _sections({"ingest": {"sources": ["a"]}, "embed": {"arch": "vit_tiny"}})
    f_ingest = expected_fingerprint(STEPS, run, "ingest", sections)
    run.write_marker("ingest", f_ingest, {"content_sha256": "aa"}, time.time())
    f_embed = expected_fingerprint(STEPS, run, "embed", sections)
    run.write_marker("embed", f_embed, {}, time.time())
    # Ingest again with the same files: the steps after it read the same inputs.
    run.write_marker("ingest", f_ingest, {"content_sha256": "aa"}, time.time())
    assert expected_fingerprint(STEPS, run, "embed", sections) == f_embed
    # Same config, but the files' bytes changed: everything downstream is out of date.
    run.write_marker("ingest", f_ingest, {"content_sha256": "bb"}, time.time())
    assert expected_fingerprint(STEPS, run, "embed", sections) != f_embed
    assert not run.is_done("embed", expected_fingerprint(STEPS, run, "embed", sections))
    # A step that runs removes the markers of the steps after it (they rebuild their manifest columns).
    run.write_marker("embed", f_embed, {}, time.time())
    invalidate_later(STEPS, run, "ingest")
    assert run.marker("ingest").exists() and not run.marker("embed").exists()
    assert downstream("ingest") == ["embed", "dedup", "cluster", "retrieve", "shard", "report"]
    assert downstream("retrieve") == ["shard", "report"] and downstream("report") == []


# --- the registry: adding a step is a record and a function --------------------------------------------------------


def _count(cfg, context):
    """A toy partitioned step: one file per partition, the summary once all exist."""
    out = context.rundir.root / "count"
    context.rundir.prepare_output(out, context.fingerprint, fresh=context.force)
    for p in context.partitions if context.partitions is not None else range(cfg.partitions):
        (out / f"{p}.txt").write_text(str(p))
    done = sorted(int(f.stem) for f in out.glob("*.txt"))
    return {"partitions": len(done)} if len(done) == cfg.partitions else None


def _total(cfg, context):
    return {"total": sum(int(f.read_text()) for f in (context.rundir.root / "count").glob("*.txt")),
            "steps": list(context.steps)}


TOY_STEPS = (
    Step("count", _count, lambda cfg: {"partitions": cfg.partitions, "batch_size": 7}, partitioned=True,
         columns=("n",), help="count the partitions"),
    Step("total", _total, lambda cfg: {"name": cfg.name}, upstream=("count",), column_prefix="total_",
         help="add them up"),
)


def _toy_config(tmp_path, partitions: int = 3):
    from curate.config import load_curate_config

    return load_curate_config(None, ["sources=[{path: pool}]", f"runs_root={tmp_path}", "name=toy",
                                     f"partitions={partitions}"])


def test_a_step_added_to_a_registry_runs_through_the_runner(tmp_path):
    cfg = _toy_config(tmp_path)
    with pytest.raises(StepOrderError, match="step 'total' needs step 'count' first, which has not run"):
        runner.run_step(TOY_STEPS, "total", cfg)
    assert runner.run_step(TOY_STEPS, "count", cfg, partitions=[0, 2]).status == "partial"
    assert not RunDir(cfg.run_dir).marker("count").exists()
    assert runner.run_step(TOY_STEPS, "count", cfg, partitions=[1]).status == "done"  # the last task completes it
    assert runner.run_step(TOY_STEPS, "total", cfg).summary == {"total": 3, "steps": ["count", "total"]}
    assert [r.status for r in runner.run_all(TOY_STEPS, cfg)] == ["skipped", "skipped"]
    assert (cfg.run_dir / "config.yaml").is_file()
    # redoing the first step invalidates the second
    assert [r.status for r in runner.run_all(TOY_STEPS, _toy_config(tmp_path, partitions=2))] == ["done", "done"]
    with pytest.raises(ValueError, match="step 'total' does not run per partition"):
        runner.run_step(TOY_STEPS, "total", cfg, partitions=[0])
    with pytest.raises(ValueError, match="unknown step 'nope'; steps: count, total"):
        runner.run_step(TOY_STEPS, "nope", cfg)
    assert runner.downstream(TOY_STEPS, "count") == ["total"]
    assert runner.owning_step(TOY_STEPS, "n") == "count" and runner.owning_step(TOY_STEPS, "total_3") == "total"


def test_the_cli_lists_and_runs_the_steps_of_its_registry(tmp_path, capsys):
    from curate.__main__ import build_parser, main

    parser = build_parser(TOY_STEPS)
    assert "  count  count the partitions\n  total  add them up\n  run    every step" in parser.epilog
    assert parser.parse_args(["total", "c.yaml"]).command == "total"
    with pytest.raises(SystemExit):
        parser.parse_args(["ingest", "c.yaml"])
    config = tmp_path / "toy.yaml"
    config.write_text(f"name: toy\nruns_root: {tmp_path}\npartitions: 2\nsources:\n  - {{path: pool}}\n")
    assert main(["count", str(config), "--partitions", "0"], steps=TOY_STEPS) == 0
    assert main(["total", str(config), "--partitions", "0"], steps=TOY_STEPS) == 2
    assert "--partitions applies to count only" in capsys.readouterr().err
    assert main(["run", str(config)], steps=TOY_STEPS) == 0
    assert "total     done" in capsys.readouterr().out


def test_the_registry_is_the_one_list_of_steps():
    from curate.__main__ import build_parser
    from curate.manifest import CLUSTER_PREFIX, STATUSES

    names = [s.name for s in STEPS]
    assert names == ["ingest", "embed", "dedup", "cluster", "retrieve", "shard", "report"]
    assert [s.name for s in STEPS if s.partitioned] == ["embed", "dedup", "shard"]
    assert all(set(s.upstream) <= set(names[:i]) for i, s in enumerate(STEPS))  # in pipeline order
    assert sorted(st for s in STEPS for st in s.statuses) == sorted(STATUSES)  # each status decided by one step
    assert [owning_step(STEPS, c) for c in ("duplicate_of", f"{CLUSTER_PREFIX}2", "selected_by", "uid", "status")] \
        == ["dedup", "cluster", "retrieve", "ingest", None]
    assert step_named("dedup").run is curate.steps.dedup.run
    assert build_parser().parse_args(["shard", "c.yaml"]).command == "shard"
    assert all(f"  {name} " in build_parser().epilog for name in names)
